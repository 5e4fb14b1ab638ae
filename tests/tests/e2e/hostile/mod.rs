//! Hostile input: what an attacker on the shop's network (with access to the purge
//! port) or a token holder could send, against real varnishd and the real binaries.

mod patterns;
