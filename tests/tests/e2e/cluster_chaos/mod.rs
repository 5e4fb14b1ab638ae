//! A cluster's bad days: three coordinators on a real 3-member etcd (`tests::ha`), with
//! real varnishd and agents, while etcd loses members or quorum, a coordinator is cut off
//! from etcd or from its peers, a leader is killed -9 mid-work, or a copied agent config
//! brings a duplicate edge id. Every coordinator must tell the same truth, and no
//! acknowledged purge may be lost.

mod answers;
mod sessions;
mod spool;
mod view;
