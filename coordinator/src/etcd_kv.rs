//! Synchronous, fenced access to the cluster's keys in etcd, for the stores whose
//! callers are synchronous (the config store, under the rollout lock when a rollout
//! starts; the warm store; neither lock is ever held across an `.await`).
//!
//! Each call runs to completion on the calling worker thread (`block_in_place`, so the
//! runtime moves its other tasks elsewhere), bounded by [`ETCD_CALL`]; it needs the
//! multi-threaded runtime `coordinator serve` runs on. The call's socket and timer are
//! driven by the other workers, so a task that waits for a lock held across one must
//! not block its worker: such a lock is a `daemon::sync::IoMutex` (the rollout lock, the
//! warm locks, the maintenance writes), whose wait moves off the worker. Every write carries the leader's
//! fence ([`Leadership::fence`]): a coordinator that is not, or no longer, the leader
//! cannot write, however late its write arrives.

use std::time::Duration;

use etcd::etcdserverpb::{request_op, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest};
use etcd::Etcd;
use tokio::sync::watch;

use crate::leader::Leadership;

/// The longest one etcd call from a store may take.
pub const ETCD_CALL: Duration = Duration::from_secs(5);

/// Why a call on the cluster's keys failed. The text is what callers show and log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// etcd answered with an error (its message).
    #[error("etcd: {0}")]
    Etcd(String),
    /// etcd did not answer within [`ETCD_CALL`].
    #[error("etcd: no answer")]
    NoAnswer,
    /// A fenced write from a coordinator that does not lead.
    #[error("not the cluster's leader: only the leader writes this")]
    NotLeader,
    /// A fenced write whose fence no longer stands: another coordinator leads now.
    #[error("deposed: another coordinator leads now; nothing was written")]
    Deposed,
}

/// Keys and values, as read.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Most operations in one etcd transaction (etcd's default limit is 128).
const OPS_PER_TXN: usize = 100;

/// Keys under `prefix`, read and written from synchronous code.
#[derive(Clone)]
pub struct EtcdKv {
    etcd: Etcd,
    prefix: String,
    leadership: watch::Receiver<Leadership>,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdKv {
    pub fn new(etcd: Etcd, prefix: &str, leadership: watch::Receiver<Leadership>) -> Self {
        EtcdKv {
            etcd,
            prefix: prefix.to_owned(),
            leadership,
        }
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The full key of `suffix`.
    pub fn key(&self, suffix: &str) -> Vec<u8> {
        format!("{}{suffix}", self.prefix).into_bytes()
    }

    /// Runs an etcd call to completion from synchronous code.
    fn block<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, KvError> {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                match tokio::time::timeout(ETCD_CALL, f).await {
                    Ok(r) => r.map_err(|e| KvError::Etcd(e.message().to_owned())),
                    Err(_) => Err(KvError::NoAnswer),
                }
            })
        })
    }

    /// The value of `suffix`.
    pub fn get(&self, suffix: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.range(self.key(suffix), false)?.pop().map(|(_, v)| v))
    }

    /// The value of `suffix`, putting `value` there first if it does not exist (creating
    /// an immutable record needs no fence: every writer would write the same).
    pub fn get_or_create(&self, suffix: &str, value: &[u8]) -> Result<Vec<u8>, KvError> {
        self.block(self.etcd.get_or_create(&self.key(suffix), value))
    }

    /// Every (key suffix, value) under `suffix`, in key order.
    pub fn list(&self, suffix: &str) -> Result<Vec<(String, Vec<u8>)>, KvError> {
        let cut = self.prefix.len();
        Ok(self
            .range(self.key(suffix), true)?
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k[cut.min(k.len())..]).into_owned(),
                    v,
                )
            })
            .collect())
    }

    fn range(&self, key: Vec<u8>, prefix: bool) -> Result<Pairs, KvError> {
        let req = RangeRequest {
            range_end: if prefix {
                etcd::prefix_end(&key)
            } else {
                Vec::new()
            },
            key,
            ..Default::default()
        };
        let resp = self.block(self.etcd.range(req))?;
        Ok(resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
    }

    /// Puts every (suffix, value), in transactions of at most `OPS_PER_TXN` (100), each
    /// only while this coordinator's leader key stands.
    pub fn put_fenced(&self, puts: &[(String, Vec<u8>)]) -> Result<(), KvError> {
        for chunk in puts.chunks(OPS_PER_TXN) {
            let ops = chunk
                .iter()
                .map(|(k, v)| etcd::op::put(&self.key(k), v))
                .collect();
            self.txn_fenced(ops)?;
        }
        Ok(())
    }

    /// Deletes every key under `suffix`, only while this coordinator leads.
    pub fn delete_fenced(&self, suffix: &str) -> Result<(), KvError> {
        let key = self.key(suffix);
        self.txn_fenced(vec![RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    range_end: etcd::prefix_end(&key),
                    key,
                    ..Default::default()
                },
            )),
        }])
    }

    fn txn_fenced(&self, ops: Vec<RequestOp>) -> Result<(), KvError> {
        let Some(fence) = self.leadership.borrow().fence() else {
            return Err(KvError::NotLeader);
        };
        let req = TxnRequest {
            compare: vec![fence],
            success: ops,
            failure: vec![],
        };
        if self.block(self.etcd.txn(req))?.succeeded {
            Ok(())
        } else {
            Err(KvError::Deposed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KvError;

    #[test]
    fn errors_read_as_the_texts_callers_show() {
        assert_eq!(
            KvError::Etcd("lost leader".into()).to_string(),
            "etcd: lost leader"
        );
        assert_eq!(KvError::NoAnswer.to_string(), "etcd: no answer");
        assert_eq!(
            KvError::NotLeader.to_string(),
            "not the cluster's leader: only the leader writes this"
        );
        assert_eq!(
            KvError::Deposed.to_string(),
            "deposed: another coordinator leads now; nothing was written"
        );
    }
}
