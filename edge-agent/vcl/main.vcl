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
# Warm requests (the edge agent's, through this varnish) prove they know the coordinator's
# warm secret without sending it: X-Warm-Sig is "<unix time>.<hex SHA-256 of the secret, the
# URL and that time>", checked by the warm_check subs below and valid for 30 s, so a value
# read from varnish's log cannot be replayed later or for another URL. Signed requests see
# the page's X-Magento-Tags (agents learn what to re-warm after a purge) and, with
# X-Warm-Refresh: 1, force a miss to refresh a cached page in place; X-Warm-Refresh: stale
# refreshes it only if it is stale (a fresh copy is a hit and costs the origin nothing; a
# fetch already under way is waited for, not doubled). A satellite region's fetches from
# its shield carry X-Warm-Tier, which only shows the tags (what anyone who can read
# varnish's log already sees), never forces a miss. Keep the warm_check subs first.
#
# Grace across tiers: a stale copy is served at once while one background fetch refreshes
# it, for ${max_stale_s} s after it went stale (a tag purge in refresh mode marks pages
# stale) while the backend is healthy, and for the whole grace while it is not. Past that
# it is a miss, so a purged price is never hidden longer. A satellite's background fetch
# asks its shield for a fresh copy (X-Tier-Fresh), and a stale copy the shield still
# answers with (its origin down) says so (X-Cache-Stale): the satellite keeps its own
# stale copy instead, or stores that one as stale, never as fresh for a day. A cacheable
# fetch that fails (5xx or no answer) replaces nothing, and a miss whose fetch failed is
# tried once more with the whole grace (stale-if-error): the probe takes up to 30 s to
# call the origin sick, and a stale copy beats an error meanwhile.
vcl 4.1;

import blob;
import std;
import xkey;

# The warm signature check runs before everything else, the WAF included: a signed request
# takes one extra pass (hash the secret, the URL and the time; compare; restart).
sub vcl_recv {
    if (req.restarts == 0) {
        unset req.http.X-Warm-Auth;
        unset req.http.X-Warm-Check;
        unset req.http.X-Warm-Fresh;
        unset req.http.X-Stale-If-Error;
        unset req.http.X-Fetched;
        if (req.http.X-Warm-Sig ~ "^[0-9]{1,12}\.[0-9a-f]{64}$" &&
            std.integer(regsub(req.http.X-Warm-Sig, "\..*$", ""), 0) >= std.integer(time=now) - 30 &&
            std.integer(regsub(req.http.X-Warm-Sig, "\..*$", ""), 0) <= std.integer(time=now) + 5) {
            set req.http.X-Warm-Check = "1";
            return (pass);
        }
        if (req.http.X-Warm-Tier == "${warm_tier_token}") {
            set req.http.X-Warm-Auth = "tags";
            if (req.http.X-Tier-Fresh == "1") {
                set req.http.X-Warm-Fresh = "1";
            }
        }
        unset req.http.X-Warm-Sig;
        unset req.http.X-Warm-Refresh;
    }
    unset req.http.X-Warm-Tier;
    unset req.http.X-Tier-Fresh;
}

sub vcl_hash {
    if (req.http.X-Warm-Check == "1") {
        hash_data("${warm_token}");
        hash_data(req.url);
        hash_data(regsub(req.http.X-Warm-Sig, "\..*$", ""));
        return (lookup);
    }
}

sub vcl_pass {
    if (req.http.X-Warm-Check == "1") {
        unset req.http.X-Warm-Check;
        if (blob.equal(req.hash, blob.decode(HEX, encoded=regsub(req.http.X-Warm-Sig, "^.*\.", "")))) {
            set req.http.X-Warm-Auth = "1";
            if (req.http.X-Warm-Refresh == "1") {
                set req.hash_always_miss = true;
            } else if (req.http.X-Warm-Refresh == "stale") {
                set req.http.X-Warm-Fresh = "1";
            }
        }
        unset req.http.X-Warm-Sig;
        unset req.http.X-Warm-Refresh;
        return (restart);
    }
}

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
    # Grace (see the top of this file): bounded while the backend is healthy, none for a
    # request that wants a fresh copy, the whole of it while the backend is sick.
    if (req.http.X-Stale-If-Error) {
        set req.grace = 3d;
    } else if (std.healthy(req.backend_hint)) {
        set req.grace = ${max_stale_s}s;
        if (req.http.X-Warm-Fresh == "1") {
            set req.grace = 0s;
        }
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
    set bereq.http.X-Warm-Tier = "${warm_tier_token}";
    # A background fetch (or a refresh) wants a fresh copy, not the shield's stale one.
    if (bereq.is_bgfetch || bereq.http.X-Warm-Fresh == "1") {
        set bereq.http.X-Tier-Fresh = "1";
    }
    unset bereq.http.X-Warm-Fresh;
    unset bereq.http.X-Fetched;
    unset bereq.http.X-Stale-If-Error;
    # The agent's mark on its own requests (varnish's log reads it from the client
    # request): the origin or a shield has no use for this agent's secret.
    unset bereq.http.X-Edge-Agent;
}

sub vcl_backend_response {
    # A cacheable fetch that failed (a background fetch, a miss, a satellite's or a
    # refresh's through the shield) replaces nothing, not even with a hit-for-miss: the
    # stale copy goes on being served (see vcl_synth). A pass keeps the origin's answer.
    if (beresp.status >= 500 && !bereq.uncacheable) {
        return (abandon);
    }
    # The shield answered with a stale copy (its origin is down): keep ours.
    if (beresp.http.X-Cache-Stale && bereq.is_bgfetch) {
        return (abandon);
    }
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
    # Or store the shield's stale copy as stale, so it is refreshed as soon as the origin
    # is back instead of passing for fresh until it expires.
    if (beresp.http.X-Cache-Stale) {
        unset beresp.http.X-Cache-Stale;
        set beresp.ttl = 0s;
    }
    return (deliver);
}

sub vcl_backend_error {
    # Same when the backend did not answer at all.
    if (!bereq.uncacheable) {
        return (abandon);
    }
}

sub vcl_synth {
    # A cache miss's fetch failed: once more, with the whole grace (a stale copy beats an
    # error).
    if (resp.status == 503 && req.http.X-Fetched == "miss" && !req.http.X-Stale-If-Error) {
        set req.http.X-Stale-If-Error = "1";
        return (restart);
    }
}

sub vcl_miss {
    # No stale copy either: do not ask the failing origin twice.
    if (req.http.X-Stale-If-Error) {
        return (synth(503, "Origin unavailable"));
    }
    set req.http.X-Fetched = "miss";
}

sub vcl_deliver {
    if (obj.uncacheable) {
        set resp.http.X-Magento-Cache-Debug = "UNCACHEABLE";
    } else if (obj.hits > 0) {
        set resp.http.X-Magento-Cache-Debug = "HIT";
    } else {
        set resp.http.X-Magento-Cache-Debug = "MISS";
    }
    if (!req.http.X-Warm-Auth) {
        unset resp.http.X-Magento-Tags;
        unset resp.http.X-Cache-Stale;
    } else if (obj.ttl < 0s) {
        # A satellite or a warm fetch is told the copy is stale (see the top).
        set resp.http.X-Cache-Stale = "1";
    } else {
        unset resp.http.X-Cache-Stale;
    }
    unset resp.http.X-Magento-Debug;
    unset resp.http.xkey;
    unset resp.http.X-Powered-By;
    unset resp.http.Server;
    unset resp.http.Via;
    unset resp.http.Link;
}
