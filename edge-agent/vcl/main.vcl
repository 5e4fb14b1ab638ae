# Magento 2 VCL for the geo-distributed coordinator (Varnish 7.1 + varnish-modules).
#
# Compatible with Magento's stock VCL (bans on X-Magento-Tags / X-Pool from the purge
# ACL), plus an xkey index of every page's tags so the edge agent can purge by tag
# without growing the ban list, and soft purges that keep the stale copy for grace.
#
# This directory is a config bundle: `coordinator config push edge-agent/vcl`.
# ${backend_host} / ${backend_port} are substituted from each region's [regions.vars]
# in coordinator.toml when the bundle is rendered for it. waf.vcl is compiled from
# waf.toml; including it before vcl_recv makes the WAF run first on every request.
# The warm_token variable is the coordinator's warm secret (never named with its
# dollar-brace form in a comment: the coordinator refuses a bundle whose comment would
# hold it). Requests carrying it as X-Warm-Token (the warmer's, and a satellite region's
# fetches from its shield) see the page's X-Magento-Tags, so agents learn what to re-warm
# after a purge and satellites can ban by tag; with X-Warm-Refresh: 1 they force a miss
# to refresh a cached page in place.
vcl 4.1;

import std;
import xkey;

include "./waf.vcl";

backend default {
    .host = "${backend_host}";
    .port = "${backend_port}";
    .first_byte_timeout = 600s;
    .probe = {
        .url = "/health_check.php";
        .timeout = 2s;
        .interval = 5s;
        .window = 10;
        .threshold = 5;
        .initial = 5;
    }
}

acl purge {
    "localhost";
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    unset req.http.X-Warm-Auth;
    if (req.http.X-Warm-Token) {
        if (req.http.X-Warm-Token == "${warm_token}") {
            set req.http.X-Warm-Auth = "1";
            if (req.http.X-Warm-Refresh == "1") {
                set req.hash_always_miss = true;
            }
        }
        unset req.http.X-Warm-Token;
    }
    unset req.http.X-Warm-Refresh;

    if (req.method == "PURGE") {
        if (client.ip !~ purge) {
            return (synth(405, "Method not allowed"));
        }
        # The edge agent's xkey purges: space-separated tags.
        if (req.http.X-Xkey-Purge) {
            if (req.http.X-Magento-Purge-Soft == "1") {
                set req.http.X-Xkey-Count = xkey.softpurge(req.http.X-Xkey-Purge);
            } else {
                set req.http.X-Xkey-Count = xkey.purge(req.http.X-Xkey-Purge);
            }
            return (synth(200, "Invalidated " + req.http.X-Xkey-Count));
        }
        # Magento's own purge requests, as the stock VCL handles them.
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

    if (req.method != "GET" && req.method != "HEAD" && req.method != "PUT" &&
        req.method != "POST" && req.method != "PATCH" && req.method != "TRACE" &&
        req.method != "OPTIONS" && req.method != "DELETE") {
        return (pipe);
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    # Never cache the health check, checkout, customer or API traffic.
    if (req.url ~ "/(pub/)?health_check\.php$" || req.url ~ "^/(checkout|customer|rest|graphql)") {
        return (pass);
    }
    # Marketing parameters do not change the page.
    if (req.url ~ "(\?|&)(gclid|fbclid|utm_[a-z]+)=") {
        set req.url = regsuball(req.url, "(gclid|fbclid|utm_[a-z]+)=[-_A-z0-9+()%.]+&?", "");
        set req.url = regsub(req.url, "[?|&]+$", "");
    }
    # Static files are cached without cookies.
    if (req.url ~ "^/(pub/)?(media|static)/") {
        unset req.http.Cookie;
    }
    return (hash);
}

sub vcl_hash {
    # Magento's context cookie: store view, currency, customer group.
    if (req.http.cookie ~ "X-Magento-Vary=") {
        hash_data(regsub(req.http.cookie, "^.*?X-Magento-Vary=([^;]+);*.*$", "\1"));
    }
    if (req.http.X-Forwarded-Proto) {
        hash_data(req.http.X-Forwarded-Proto);
    }
}

sub vcl_backend_fetch {
    # Upstream may be a shield varnish: let it show this page's tags (Magento ignores the
    # header).
    unset bereq.http.X-Warm-Auth;
    set bereq.http.X-Warm-Token = "${warm_token}";
}

sub vcl_backend_response {
    set beresp.grace = 3d;
    # Index the page's tags for xkey (space-separated).
    if (beresp.http.X-Magento-Tags) {
        set beresp.http.xkey = regsuball(beresp.http.X-Magento-Tags, ",", " ");
    }
    if (beresp.http.content-type ~ "text") {
        set beresp.do_esi = true;
    }
    # Only cache what Magento marks cacheable.
    if (beresp.ttl <= 0s || beresp.http.Set-Cookie || beresp.http.Surrogate-control ~ "no-store" ||
        beresp.http.Cache-Control ~ "private|no-cache|no-store") {
        set beresp.ttl = 120s;
        set beresp.uncacheable = true;
    }
    return (deliver);
}

sub vcl_hit {
    if (obj.ttl >= 0s) {
        return (deliver);
    }
    # Stale: serve it while a background fetch refreshes it, for 300 s when the backend
    # is healthy and for the whole grace when it is not.
    if (std.healthy(req.backend_hint)) {
        if (obj.ttl + 300s > 0s) {
            return (deliver);
        }
        return (pass);
    }
    return (deliver);
}

sub vcl_deliver {
    if (obj.uncacheable) {
        set resp.http.X-Magento-Cache-Debug = "UNCACHEABLE";
    } else if (obj.hits > 0) {
        set resp.http.X-Magento-Cache-Debug = "HIT";
    } else {
        set resp.http.X-Magento-Cache-Debug = "MISS";
    }
    if (req.http.X-Warm-Auth != "1") {
        unset resp.http.X-Magento-Tags;
    }
    unset resp.http.X-Magento-Debug;
    unset resp.http.xkey;
    unset resp.http.X-Powered-By;
    unset resp.http.Server;
    unset resp.http.Via;
    unset resp.http.Link;
}
