//! Hostile input: what an attacker on the shop's network (or a token holder) sends to the
//! coordinator's ports and bundles, against real varnishd and the real binaries.

mod slots;
