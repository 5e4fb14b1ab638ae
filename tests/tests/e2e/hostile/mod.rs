//! Hostile input: what someone allowed on a port (or holding a token, or reading varnish's
//! log) can send or see, against real varnishd and the real binaries: none of it crashes an
//! edge, smuggles a purge, exhausts the coordinator, escapes a bundle or reveals a secret.
//! Each test is an attack that worked once: it must fail on the code before the fix.

mod http;
mod patterns;
mod slots;
mod warm;
