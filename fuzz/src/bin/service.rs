//! The service's messages as they come off the wire: the first byte picks the message
//! (a stream's `SessionRequest`, a unary `BatchRequest`, or `SessionOptions`), the rest is
//! its protobuf encoding. What the server does with a decoded message before it reaches the
//! runtime runs too: hidden states decoded and checked, session options read and applied to a
//! config (names checked, types, ranges).
use std::path::Path;

use probe_cascade_server::convert::decode_hidden;
use probe_cascade_server::proto::v1 as pb;
use probe_cascade_server::state::{Live, Requested};
use prost::Message;

const CONFIG: &str = include_str!("../../../config/realtime.toml");

fn options(live: &Live, o: &pb::SessionOptions) {
    if let Ok(requested) = Requested::from_proto(o) {
        let _ = requested.options(live);
    }
}

fn main() {
    let live = Live::parse(CONFIG, Path::new("config/realtime.toml")).expect("the shipped config");
    afl::fuzz!(|data: &[u8]| {
        let Some((&kind, bytes)) = data.split_first() else { return };
        match kind % 3 {
            0 => {
                if let Ok(m) = pb::SessionRequest::decode(bytes) {
                    match m.kind {
                        Some(pb::session_request::Kind::Open(o)) => options(&live, &o),
                        Some(pb::session_request::Kind::Hidden(h)) => {
                            let _ = decode_hidden(&h);
                        }
                        _ => {}
                    }
                }
            }
            1 => {
                if let Ok(m) = pb::BatchRequest::decode(bytes) {
                    for item in &m.items {
                        if let Some(h) = &item.hidden {
                            let _ = decode_hidden(h);
                        }
                    }
                }
            }
            _ => {
                if let Ok(o) = pb::SessionOptions::decode(bytes) {
                    options(&live, &o);
                }
            }
        }
    });
}
