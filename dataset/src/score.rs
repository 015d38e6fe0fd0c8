//! Scoring recordings: each its own session on one shared `Runtime`, many at once, so that the
//! runtime batches their tokens into steps as it batches any sessions' (one code path with
//! `serve` and Python's sessions).
//!
//! Why a recording is the unit: a cascade is stateful per sequence (its active set, its
//! simplex baselines), so a recording is never split across sessions, and its results are
//! kept or dropped whole. The command line and the Python package (its Ray actors) both score
//! through [`score_all`].

use std::sync::Arc;

use futures::StreamExt;
use probe_cascade::engine::TokenReport;
use probe_cascade::npy::Matrix;
use probe_cascade::pack::Pack;
use probe_cascade::runtime::{Runtime, RuntimeError, SessionOptions};

use crate::recordings::{Recording, RecordingError};

/// Why a run stopped (a recording that fails is an [`Outcome`], not this).
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// The runtime itself failed (not one recording's token): nothing after it is trusted.
    #[error("recording {recording}: the runtime failed")]
    Runtime {
        recording: String,
        #[source]
        source: Box<RuntimeError>,
    },
    #[error(
        "concurrency {concurrency} is more than runtime.max_sessions = {max_sessions}: lower it, or raise the key"
    )]
    Concurrency { concurrency: usize, max_sessions: usize },
    #[error("concurrency must be at least 1")]
    NoConcurrency,
    #[error("a scoring task ended abnormally")]
    Join(#[from] tokio::task::JoinError),
}

/// Why a recording, or one of its tokens, has no results: a row of the `failures` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The token, when the failure is one token's.
    pub token: Option<u32>,
    pub error: String,
}

/// One recording's results.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub recording: String,
    /// Its tokens' reports with their positions in the recording. Empty when the recording
    /// failed (without `skip_bad_tokens`, one bad token fails the whole recording).
    pub reports: Vec<(u32, TokenReport)>,
    pub failures: Vec<Failure>,
}

impl Outcome {
    fn failed(recording: String, token: Option<u32>, error: String) -> Self {
        Self { recording, reports: Vec::new(), failures: vec![Failure { token, error }] }
    }
}

/// How recordings are scored.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Recordings scored at once (sessions open at once; at most `runtime.max_sessions`).
    pub concurrency: usize,
    /// A bad token (wrong width, a NaN) becomes a failure row and the recording goes on;
    /// without it, the recording fails whole at its first bad token.
    pub skip_bad_tokens: bool,
}

/// Scores `recordings` on `runtime`, `options.concurrency` at a time, handing each recording's
/// [`Outcome`] to `done` as it finishes (in finishing order). A recording is read when its turn
/// comes, so at most `concurrency` recordings' states are in memory. A bad recording or token is
/// an outcome with failures; only the runtime's own failure (or `done`'s error) stops the run.
pub async fn score_all<E>(
    runtime: &Runtime,
    recordings: impl IntoIterator<Item = Recording>,
    options: Options,
    mut done: impl FnMut(Outcome) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<ScoreError>,
{
    let max_sessions = runtime.config().runtime.max_sessions;
    if options.concurrency == 0 {
        return Err(ScoreError::NoConcurrency.into());
    }
    if options.concurrency > max_sessions {
        return Err(ScoreError::Concurrency { concurrency: options.concurrency, max_sessions }.into());
    }
    let pack = runtime.pack().clone();
    let mut running = futures::stream::iter(recordings.into_iter().map(|recording| {
        let runtime = runtime.clone();
        let pack = pack.clone();
        async move {
            let name = recording.name.clone();
            let states = tokio::task::spawn_blocking(move || recording.load()).await.map_err(ScoreError::from)?;
            score_one(&runtime, &pack, name, states, options.skip_bad_tokens).await
        }
    }))
    .buffer_unordered(options.concurrency);
    while let Some(outcome) = running.next().await {
        done(outcome?)?;
    }
    Ok(())
}

/// One recording, back to back on its own session.
async fn score_one(
    runtime: &Runtime,
    pack: &Arc<Pack>,
    recording: String,
    states: Result<Matrix, RecordingError>,
    skip_bad_tokens: bool,
) -> Result<Outcome, ScoreError> {
    let states = match states {
        Ok(m) => m,
        Err(e) => return Ok(Outcome::failed(recording, None, error_chain(&e))),
    };
    let width = pack.hidden_states() * pack.hidden_dim();
    if states.cols != width {
        let layers = if pack.hidden_states() == 1 {
            String::new()
        } else {
            format!(" (model layers {:?} side by side)", pack.model_layers())
        };
        let error = format!("{} values per token, but the pack's probes read {width}{layers}", states.cols);
        return Ok(Outcome::failed(recording, None, error));
    }
    let session = match runtime.open_session(SessionOptions::default()).await {
        Ok(s) => s,
        Err(source) => return Err(ScoreError::Runtime { recording, source: Box::new(source) }),
    };
    let mut out = Outcome { recording, reports: Vec::with_capacity(states.rows), failures: Vec::new() };
    for t in 0..states.rows {
        let token = t as u32;
        match session.observe_states(probe_cascade::engine::token_states(states.row(t), pack)).await {
            Ok(mut r) => {
                // What no table holds: every scored probe's id and score (the oracle's
                // comparison needs them, a dataset does not). Dropped, so that a long
                // recording's reports stay small while the rest of it is scored.
                r.scored_ids = Vec::new();
                r.scored_logits = Vec::new();
                r.scored_probs = Vec::new();
                out.reports.push((token, r))
            }
            Err(e) if e.token().is_some() => {
                out.failures.push(Failure { token: Some(token), error: error_chain(&e) });
                if !skip_bad_tokens {
                    out.reports.clear();
                    break;
                }
            }
            Err(source) => {
                session.close().await;
                return Err(ScoreError::Runtime { recording: out.recording, source: Box::new(source) });
            }
        }
    }
    session.close().await;
    Ok(out)
}

/// An error and its sources, as one line (what a `failures` row says).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
