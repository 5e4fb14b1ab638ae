//! Hostile input: what an attacker on the shop's network (or a token holder) can send,
//! and that none of it crashes an edge, smuggles a purge or exhausts the coordinator.

mod http;
