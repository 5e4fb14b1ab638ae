# A stand-in for Magento 2.4's stock VCL (app/code/Magento/PageCache/etc/varnish6.vcl,
# Open Software License 3.0, as `bin/magento varnish:vcl:generate` writes it), for the
# hit-ratio tests. This file is written for this project, not copied: it does what the
# stock file does where it matters to an edge agent, in the stock file's template form
# (the placeholders host, port, ips, grace_period, ssl_offloaded_header and
# design_exceptions_code, each in a C comment with double braces), which the test fills
# the way the generator does, so the real file can be put in its place unchanged:
#
# * `X-Magento-Cache-Debug` only in developer mode (the backend's `X-Magento-Debug`), as
#   Magento's VCL long did: in production no response says whether it was a hit;
# * health checks, static files, customer and checkout pages, non-GET requests pass;
# * PURGE from the ACL bans by `X-Magento-Tags-Pattern` or `X-Pool`;
# * pages are cached with three days of grace, a healthy backend serves stale only for
#   the grace period, errors and private pages are not cached, and the backend is probed
#   at /health_check.php;
# * `Age`, `X-Varnish`, `Via`, `Server` and the tags are removed from responses.
vcl 4.0;

import std;

backend default {
    .host = "/* {{ host }} */";
    .port = "/* {{ port }} */";
    .first_byte_timeout = 600s;
    .probe = {
        .url = "/health_check.php";
        .timeout = 2s;
        .interval = 5s;
        .window = 10;
        .threshold = 5;
    }
}

acl purge {
/* {{ ips }} */
}

sub vcl_recv {
    if (req.restarts > 0) {
        set req.hash_always_miss = true;
    }

    if (req.method == "PURGE") {
        if (client.ip !~ purge) {
            return (synth(405, "Method not allowed"));
        }
        if (!req.http.X-Magento-Tags-Pattern && !req.http.X-Pool) {
            return (synth(400, "X-Magento-Tags-Pattern or X-Pool header required"));
        }
        if (req.http.X-Magento-Tags-Pattern) {
            ban("obj.http.X-Magento-Tags ~ " + req.http.X-Magento-Tags-Pattern);
        }
        if (req.http.X-Pool) {
            ban("obj.http.X-Pool ~ " + req.http.X-Pool);
        }
        return (synth(200, "Purged"));
    }

    # Only GET and HEAD are looked up; other methods go to Magento.
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }

    # Per-shopper pages and the health check are never cached.
    if (req.url ~ "/customer" || req.url ~ "/checkout" ||
        req.url ~ "^/(pub/)?(health_check.php)$") {
        return (pass);
    }

    set req.http.grace = "none";
    set req.url = regsub(req.url, "^http[s]?://", "");
    std.collect(req.http.Cookie);

    # Analytics parameters do not make another page.
    if (req.url ~ "(\?|&)(utm_[a-z]+|gclid|fbclid)=") {
        set req.url = regsuball(req.url, "(utm_[a-z]+|gclid|fbclid)=[-_A-z0-9+()%.]+&?", "");
        set req.url = regsub(req.url, "[?|&]+$", "");
    }

    # Static files are served by the web server.
    if (req.url ~ "^/(pub/)?(media|static)/") {
        return (pass);
    }

    return (hash);
}

sub vcl_hash {
    if (req.http.cookie ~ "X-Magento-Vary=") {
        hash_data(regsub(req.http.cookie, "^.*?X-Magento-Vary=([^;]+);*.*$", "\1"));
    }
    if (req.http./* {{ ssl_offloaded_header }} */) {
        hash_data(req.http./* {{ ssl_offloaded_header }} */);
    }
    /* {{ design_exceptions_code }} */
}

sub vcl_backend_response {
    # Errors are not cached.
    if (beresp.status == 403 || beresp.status == 404 || beresp.status >= 500) {
        set beresp.uncacheable = true;
        set beresp.ttl = 120s;
        return (deliver);
    }

    set beresp.grace = 3d;

    if (beresp.http.content-type ~ "text") {
        set beresp.do_esi = true;
    }
    if (bereq.url ~ "\.js$" || beresp.http.content-type ~ "text|javascript|json|css") {
        set beresp.do_gzip = true;
    }

    if (beresp.http.Cache-Control ~ "private") {
        set beresp.uncacheable = true;
        set beresp.ttl = 86400s;
        return (deliver);
    }

    # A page that sets the vary cookie for a request without it is not cached under the
    # request's key; cookies are never cached.
    if (beresp.ttl > 0s && (bereq.method == "GET" || bereq.method == "HEAD")) {
        std.collect(beresp.http.set-cookie);
        if (bereq.http.cookie !~ "X-Magento-Vary=" &&
            beresp.http.set-cookie ~ "X-Magento-Vary=") {
            set beresp.ttl = 0s;
            set beresp.uncacheable = true;
        }
        unset beresp.http.set-cookie;
    }

    # Uncacheable pages pass for two minutes (hit-for-pass).
    if (beresp.ttl <= 0s ||
        beresp.http.Surrogate-control ~ "no-store" ||
        (!beresp.http.Surrogate-Control && beresp.http.Cache-Control ~ "no-cache|no-store") ||
        beresp.http.Vary == "*") {
        set beresp.ttl = 120s;
        set beresp.uncacheable = true;
    }

    return (deliver);
}

sub vcl_deliver {
    if (resp.http.X-Magento-Debug) {
        if (obj.uncacheable) {
            set resp.http.X-Magento-Cache-Debug = "UNCACHEABLE";
        } else if (obj.hits) {
            set resp.http.X-Magento-Cache-Debug = "HIT";
            set resp.http.Grace = req.http.grace;
        } else {
            set resp.http.X-Magento-Cache-Debug = "MISS";
        }
    } else {
        unset resp.http.Age;
    }

    # Browsers do not cache pages.
    if (resp.http.Cache-Control !~ "private" && req.url !~ "^/(pub/)?(media|static)/") {
        set resp.http.Pragma = "no-cache";
        set resp.http.Expires = "-1";
        set resp.http.Cache-Control = "no-store, no-cache, must-revalidate, max-age=0";
    }

    unset resp.http.X-Magento-Debug;
    unset resp.http.X-Magento-Tags;
    unset resp.http.X-Powered-By;
    unset resp.http.Server;
    unset resp.http.X-Varnish;
    unset resp.http.Via;
    unset resp.http.Link;
}

sub vcl_hit {
    if (obj.ttl >= 0s) {
        return (deliver);
    }
    if (std.healthy(req.backend_hint)) {
        if (obj.ttl + /* {{ grace_period }} */s > 0s) {
            set req.http.grace = "normal (healthy server)";
            return (deliver);
        }
        # Past its grace: fetch it again.
        return (restart);
    }
    # The backend is down: serve what is cached.
    set req.http.grace = "unlimited (unhealthy server)";
    return (deliver);
}
