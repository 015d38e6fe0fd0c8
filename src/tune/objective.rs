//! `--objective "max recall_top10 where p50_ms <= 2 and peak_ram_mb < 800"`: which figure to
//! maximize or minimize, among the candidates that meet every condition.

use super::TuneError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Max,
    Min,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Le,
    Lt,
    Ge,
    Gt,
    Eq,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Le => a <= b,
            Op::Lt => a < b,
            Op::Ge => a >= b,
            Op::Gt => a > b,
            Op::Eq => a == b,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub text: String,
    pub goal: Goal,
    pub metric: String,
    conditions: Vec<(String, Op, f64)>,
}

impl Objective {
    /// Parses `max|min METRIC [where METRIC OP NUMBER [and …]]`; every metric must be one of
    /// `metrics`.
    pub fn parse(text: &str, metrics: &[&str]) -> Result<Self, TuneError> {
        let bad = |message: String| TuneError::Objective { objective: text.to_string(), message };
        let known = |m: &str| {
            if metrics.contains(&m) {
                Ok(m.to_string())
            } else {
                Err(bad(format!("unknown figure `{m}` (expected one of {})", metrics.join(", "))))
            }
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        let goal = match words.first() {
            Some(&"max") => Goal::Max,
            Some(&"min") => Goal::Min,
            _ => return Err(bad("must start with `max` or `min`".into())),
        };
        let metric = known(words.get(1).ok_or_else(|| bad("names no figure after max/min".into()))?)?;
        let mut conditions = Vec::new();
        match words.get(2) {
            None => {}
            Some(&"where") => {
                let rest = &words[3..];
                if rest.is_empty() {
                    return Err(bad("`where` needs a condition like `p50_ms <= 2`".into()));
                }
                for clause in rest.split(|w| *w == "and") {
                    let [m, op, n] = clause else {
                        return Err(bad(format!("`{}` is not `FIGURE OP NUMBER`", clause.join(" "))));
                    };
                    let op = match *op {
                        "<=" => Op::Le,
                        "<" => Op::Lt,
                        ">=" => Op::Ge,
                        ">" => Op::Gt,
                        "==" | "=" => Op::Eq,
                        other => return Err(bad(format!("unknown comparison `{other}` (<=, <, >=, >, ==)"))),
                    };
                    let n: f64 = n.parse().map_err(|_| bad(format!("`{n}` is not a number")))?;
                    conditions.push((known(m)?, op, n));
                }
            }
            Some(other) => return Err(bad(format!("expected `where` after the figure, found `{other}`"))),
        }
        Ok(Self { text: text.to_string(), goal, metric, conditions })
    }

    /// Whether a candidate meets every condition (`figure` gives its figures by name; a
    /// figure it lacks fails the condition).
    pub fn admits(&self, figure: impl Fn(&str) -> Option<f64>) -> bool {
        self.conditions.iter().all(|(m, op, n)| figure(m).is_some_and(|v| op.holds(v, *n)))
    }

    /// The best admitted candidate: its index. Ties go to the lower `tie_break` figure, then
    /// to the earlier candidate. `None` when none is admitted.
    pub fn choose<F: Fn(&str) -> Option<f64>>(&self, candidates: &[F], tie_break: &str) -> Option<usize> {
        let score = |f: &F| {
            let v = f(&self.metric).unwrap_or(f64::NAN);
            if self.goal == Goal::Max {
                v
            } else {
                -v
            }
        };
        let mut best: Option<usize> = None;
        for (i, c) in candidates.iter().enumerate() {
            if !self.admits(c) || score(c).is_nan() {
                continue;
            }
            best = match best {
                None => Some(i),
                Some(b) => {
                    let (sb, sc) = (score(&candidates[b]), score(c));
                    let tb = |f: &F| f(tie_break).unwrap_or(f64::INFINITY);
                    if sc > sb || (sc == sb && tb(c) < tb(&candidates[b])) {
                        Some(i)
                    } else {
                        Some(b)
                    }
                }
            };
        }
        best
    }

    /// The conditions, for messages: `p50_ms <= 2`.
    pub fn conditions(&self) -> Vec<String> {
        self.conditions
            .iter()
            .map(|(m, op, n)| {
                let op = match op {
                    Op::Le => "<=",
                    Op::Lt => "<",
                    Op::Ge => ">=",
                    Op::Gt => ">",
                    Op::Eq => "==",
                };
                format!("{m} {op} {n}")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: [&str; 3] = ["recall_top10", "p50_ms", "peak_ram_mb"];

    fn figures(recall: f64, p50: f64) -> impl Fn(&str) -> Option<f64> {
        move |m| match m {
            "recall_top10" => Some(recall),
            "p50_ms" => Some(p50),
            _ => None,
        }
    }

    #[test]
    fn picks_the_best_admitted_with_ties_to_the_faster() {
        let o = Objective::parse("max recall_top10 where p50_ms <= 2", &METRICS).unwrap();
        let c = [figures(0.9, 3.0), figures(0.7, 1.5), figures(0.7, 1.0), figures(0.5, 0.5)];
        assert_eq!(o.choose(&c, "p50_ms"), Some(2));
        let o = Objective::parse("min p50_ms where recall_top10 >= 0.6", &METRICS).unwrap();
        assert_eq!(o.choose(&c, "p50_ms"), Some(2));
        let o = Objective::parse("max recall_top10", &METRICS).unwrap();
        assert_eq!(o.choose(&c, "p50_ms"), Some(0));
        let o = Objective::parse("max recall_top10 where p50_ms < 0.1", &METRICS).unwrap();
        assert_eq!(o.choose(&c, "p50_ms"), None);
        // A figure a candidate lacks fails its condition.
        let o = Objective::parse("max recall_top10 where peak_ram_mb < 10", &METRICS).unwrap();
        assert_eq!(o.choose(&c, "p50_ms"), None);
        let o = Objective::parse("max recall_top10 where p50_ms <= 2 and recall_top10 > 0.6", &METRICS).unwrap();
        assert_eq!(o.conditions(), vec!["p50_ms <= 2", "recall_top10 > 0.6"]);
    }

    #[test]
    fn bad_objectives_say_what_is_wrong() {
        let e = |t: &str| Objective::parse(t, &METRICS).unwrap_err().to_string();
        assert!(e("best recall").contains("max` or `min"));
        assert!(e("max recal").contains("unknown figure `recal`"));
        assert!(e("max recall_top10 where p50 <= 2").contains("unknown figure `p50`"));
        assert!(e("max recall_top10 where p50_ms <= fast").contains("`fast` is not a number"));
        assert!(e("max recall_top10 where p50_ms ~ 2").contains("unknown comparison"));
        assert!(e("max recall_top10 if p50_ms <= 2").contains("expected `where`"));
        assert!(e("max recall_top10 where").contains("needs a condition"));
        assert!(e("max recall_top10 where p50_ms <=").contains("FIGURE OP NUMBER"));
    }
}
