//! `probe-cascade tune`'s pure parts: the grid of config values to sweep, the objective that
//! picks a point, and the Pareto front of latency against recall. The measuring and the
//! outputs are the command line's (cli/src/cli/tune.rs).

mod grid;
mod objective;
mod pareto;

pub use grid::{apply, parse_grid, points, GridKey, Setting, MAX_POINTS};
pub use objective::{Goal, Objective};
pub use pareto::pareto_front;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TuneError {
    #[error("--grid: {0}")]
    Grid(String),
    #[error("--grid key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("--objective `{objective}`: {message}")]
    Objective { objective: String, message: String },
}
