//! The session's codec: prost's encoding, except that a [`PurgeBatch`] may carry its
//! entries already encoded ([`PurgeBatch::encoded`]), which are then written as they are.
//!
//! A coordinator with a thousand sessions sends the same entries to every one of them.
//! Encoding each entry once (when it enters the log's tail) and copying those bytes into
//! each session's frame costs a memcpy per session instead of a clone and an encode.
//! The bytes on the wire are exactly what prost would write for `entries` (field 1,
//! length-delimited, once per entry), so agents decode an ordinary `PurgeBatch` and field
//! 15 never leaves the coordinator.

use std::marker::PhantomData;

use prost::bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::edge::{coordinator_message, AgentMessage, CoordinatorMessage, PurgeBatch, PurgeEntry};

/// The field number of `CoordinatorMessage.purges`.
const PURGES_FIELD: u32 = 2;
/// The field number of `PurgeBatch.entries`.
const ENTRIES_FIELD: u32 = 1;

/// How a message is written on the session's stream.
pub trait WireEncode {
    fn encode_wire(&self, buf: &mut impl BufMut);
}

impl WireEncode for AgentMessage {
    fn encode_wire(&self, buf: &mut impl BufMut) {
        self.encode_raw(buf);
    }
}

impl WireEncode for CoordinatorMessage {
    fn encode_wire(&self, buf: &mut impl BufMut) {
        match &self.msg {
            Some(coordinator_message::Msg::Purges(batch)) if !batch.encoded.is_empty() => {
                let inner = batch.encoded.len() + entries_len(batch);
                encode_key(PURGES_FIELD, WireType::LengthDelimited, buf);
                encode_varint(inner as u64, buf);
                buf.put_slice(&batch.encoded);
                for e in &batch.entries {
                    prost::encoding::message::encode(ENTRIES_FIELD, e, buf);
                }
            }
            _ => self.encode_raw(buf),
        }
    }
}

fn entries_len(batch: &PurgeBatch) -> usize {
    prost::encoding::message::encoded_len_repeated(ENTRIES_FIELD, &batch.entries)
}

/// One entry as it appears inside an encoded `PurgeBatch` (key, length, message): what
/// [`PurgeBatch::encoded`] is a concatenation of.
pub fn encode_entry(entry: &PurgeEntry) -> Vec<u8> {
    let len = entry.encoded_len();
    let mut out = Vec::with_capacity(1 + encoded_len_varint(len as u64) + len);
    prost::encoding::message::encode(ENTRIES_FIELD, entry, &mut out);
    out
}

/// The codec tonic-build wires into the service (`codec_path`).
#[derive(Debug, Clone)]
pub struct EdgeCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for EdgeCodec<T, U> {
    fn default() -> Self {
        EdgeCodec(PhantomData)
    }
}

impl<T, U> Codec for EdgeCodec<T, U>
where
    T: WireEncode + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = EdgeEncoder<T>;
    type Decoder = EdgeDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        EdgeEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        EdgeDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct EdgeEncoder<T>(PhantomData<T>);

impl<T: WireEncode> Encoder for EdgeEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode_wire(buf);
        Ok(())
    }
}

#[derive(Debug)]
pub struct EdgeDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for EdgeDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::{purge_entry::Op, TagSet};

    fn entry(seq: u64, tag: &str) -> PurgeEntry {
        PurgeEntry {
            seq,
            received_at_us: 7,
            op: Some(Op::Tags(TagSet {
                tags: vec![tag.into()],
            })),
            soft: false,
            first_seq: 0,
        }
    }

    #[test]
    fn encoded_entries_are_the_bytes_prost_writes() {
        let entries = vec![entry(1, "cat_p_1"), entry(2, "cat_c_22")];
        let plain = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Purges(PurgeBatch {
                entries: entries.clone(),
                encoded: Default::default(),
            })),
        };
        let encoded: Vec<u8> = entries.iter().flat_map(encode_entry).collect();
        let pre = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Purges(PurgeBatch {
                entries: vec![],
                encoded: encoded.into(),
            })),
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        plain.encode_wire(&mut a);
        pre.encode_wire(&mut b);
        assert_eq!(a, b);
        let back = CoordinatorMessage::decode(b.as_slice()).unwrap();
        assert_eq!(back, plain);
    }
}
