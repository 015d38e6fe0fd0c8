//! The service under load, over loopback: 32 concurrent client streams, each sending its
//! tokens with several in flight, with random disconnects (a stream dropped with tokens
//! unanswered, then a new one opened), and bad messages mixed in (a wrong width, NaN, a byte
//! count that does not match `len`, an unset dtype, a second `open`). It checks:
//!
//! - every message a stream got an answer to was answered exactly once, in order (`seq` 0, 1,
//!   2, … with no gap or repeat), and a stream that ends normally gets an answer to every
//!   message it sent;
//! - good tokens get reports, and each bad message an error of kind `BAD_HIDDEN` that says
//!   what is wrong, while the stream goes on;
//! - no session leaks: once every client has gone, the server and the runtime hold none, and
//!   the step scheduler no slots.
//!
//! It prints p50 and p99 per token (send to answer) under the load. `make test` runs 32 × 250
//! tokens; `LOAD_TOKENS=2000 cargo test --release -p probe-cascade-server --test load --
//! --nocapture` runs the full 32 × 2,000 that docs/reliability.md records.

mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use probe_cascade_server::convert::encode_f32;
use probe_cascade_server::proto::v1 as pb;
use rand::{Rng, SeedableRng};

const STREAMS: usize = 32;
/// Tokens in flight per stream.
const WINDOW: usize = 8;
/// Per message: the chance it is bad, and the chance the client disconnects after sending it.
const BAD: f64 = 0.02;
const DISCONNECT: f64 = 0.004;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Sent {
    Good,
    /// A bad message, and what its error must say.
    Bad(&'static str),
}

/// A bad message of kind `k`, and a phrase its error names.
fn bad_message(k: usize, row: &[f32]) -> (pb::SessionRequest, &'static str) {
    let mut h = encode_f32(row);
    let want = match k % 5 {
        0 => {
            h = encode_f32(&row[1..]);
            "values but the pack"
        }
        1 => {
            let mut v = row.to_vec();
            v[3] = f32::NAN;
            h = encode_f32(&v);
            "NaN"
        }
        2 => {
            h.len += 1;
            "bytes"
        }
        3 => {
            h.dtype = pb::Dtype::Unspecified as i32;
            "dtype"
        }
        _ => return (open_msg(Default::default()), "must be `hidden`"),
    };
    (hidden_msg(h), want)
}

#[derive(Default)]
struct Tally {
    reports: usize,
    errors: usize,
    streams: usize,
    disconnects: usize,
    unanswered_at_disconnect: usize,
    latencies_us: Vec<u64>,
}

/// One client: `tokens` good tokens in all, over as many streams as its disconnects make.
async fn client(f: Arc<Fixture>, server_url: String, c: usize, tokens: usize) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
    let mut client = pb::probe_cascade_client::ProbeCascadeClient::connect(server_url).await.unwrap();
    let trace = &f.traces[c % f.traces.len()];
    let mut tally = Tally::default();
    let mut good_done = 0;
    while good_done < tokens {
        let mut s = open(&mut client, Default::default()).await;
        tally.streams += 1;
        let mut sent: VecDeque<(u64, Sent, Instant)> = VecDeque::new();
        let (mut next_seq, mut want_seq) = (0u64, 0u64);
        let mut good_sent = good_done;
        let mut disconnect = false;
        loop {
            while sent.len() < WINDOW && good_sent < tokens && !disconnect {
                let row = trace.row((c * 7 + good_sent) % trace.rows);
                let (msg, what) = if rng.random_bool(BAD) {
                    let (m, want) = bad_message(rng.random_range(0..5), row);
                    (m, Sent::Bad(want))
                } else {
                    good_sent += 1;
                    (hidden_msg(encode_f32(row)), Sent::Good)
                };
                s.tx.send(msg).await.unwrap();
                sent.push_back((next_seq, what, Instant::now()));
                next_seq += 1;
                disconnect = rng.random_bool(DISCONNECT);
            }
            if disconnect && rng.random_bool(0.5) || sent.is_empty() {
                break;
            }
            let r = s.result().await;
            let (seq, what, at) = sent.pop_front().unwrap();
            assert_eq!(r.seq, want_seq, "client {c}: answers in order, each once");
            assert_eq!(r.seq, seq);
            want_seq += 1;
            match (what, &r.outcome) {
                (Sent::Good, Some(pb::token_result::Outcome::Report(_))) => {
                    tally.reports += 1;
                    good_done += 1;
                    tally.latencies_us.push(at.elapsed().as_micros() as u64);
                }
                (Sent::Bad(want), Some(pb::token_result::Outcome::Error(e))) => {
                    assert_eq!(e.kind, pb::ErrorKind::BadHidden as i32, "client {c}: {e:?}");
                    assert!(e.message.contains(want), "client {c}: the error names the fault ({want}): {}", e.message);
                    tally.errors += 1;
                }
                other => panic!("client {c}: seq {seq}: sent {what:?}, got {:?}", other.1),
            }
        }
        if disconnect && !sent.is_empty() {
            // Dropped with tokens unanswered: their answers are lost with the stream, and the
            // tokens are sent again on the next one.
            tally.disconnects += 1;
            tally.unanswered_at_disconnect += sent.len();
            good_done = good_sent - sent.iter().filter(|(_, w, _)| *w == Sent::Good).count();
            drop(s);
        } else {
            if disconnect {
                tally.disconnects += 1;
            }
            // A normal end: the client closes its side, and the server ends the stream.
            drop(s.tx);
            assert!(s.rx.message().await.unwrap_or(None).is_none(), "client {c}: nothing after the last answer");
        }
    }
    tally
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_streams_with_disconnects_and_bad_messages_are_answered_exactly_once_in_order() {
    let tokens: usize = std::env::var("LOAD_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(250);
    let f = Arc::new(fixture());
    let server = serve(&f, &realtime(""), false, None).await;
    let url = format!("http://{}", server.grpc_addr().unwrap());
    let t0 = Instant::now();
    let clients: Vec<_> = (0..STREAMS).map(|c| tokio::spawn(client(f.clone(), url.clone(), c, tokens))).collect();
    let mut all = Tally::default();
    for c in clients {
        let t = c.await.expect("a client panicked");
        all.reports += t.reports;
        all.errors += t.errors;
        all.streams += t.streams;
        all.disconnects += t.disconnects;
        all.unanswered_at_disconnect += t.unanswered_at_disconnect;
        all.latencies_us.extend(t.latencies_us);
    }
    let wall = t0.elapsed();
    assert_eq!(all.reports, STREAMS * tokens, "every good token was answered with a report");
    assert!(all.errors > 0 && all.disconnects > 0, "the load had bad messages and disconnects in it");

    // No session leaks: the server notices the disconnects and closes their sessions.
    let state = server.state().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (state.open_sessions() > 0 || !state.runtime.sessions().is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state.open_sessions(), 0, "the server holds no session");
    assert!(state.runtime.sessions().is_empty(), "the runtime holds no session");
    let steps = state.runtime.step_stats().await.unwrap();
    assert_eq!((steps.sessions, steps.held_probes), (0, 0), "the step scheduler holds no slots");

    all.latencies_us.sort_unstable();
    println!(
        "load: {STREAMS} streams × {tokens} tokens: {} reports, {} bad messages answered with errors, {} streams \
         ({} disconnects, {} answers lost with them), {:.1} s, {:.0} tokens/s; per token p50 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms",
        all.reports,
        all.errors,
        all.streams,
        all.disconnects,
        all.unanswered_at_disconnect,
        wall.as_secs_f64(),
        all.reports as f64 / wall.as_secs_f64(),
        percentile(&all.latencies_us, 0.5),
        percentile(&all.latencies_us, 0.99),
        percentile(&all.latencies_us, 1.0),
    );
    server.drain().await;
}
