//! Hostile input: what someone allowed on a port (or holding a token, or reading varnish's
//! log) can send or see, against real varnishd and the real binaries. Each test is an
//! attack that worked once: it must fail on the code before the fix.

mod patterns;
mod warm;
