//! The Pareto front of latency (lower is better) against recall (higher is better).

/// Indices of the points no other point beats on both counts (as fast or faster and as good
/// or better, strictly on one), ordered by latency.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let beats = |a: (f64, f64), b: (f64, f64)| a.0 <= b.0 && a.1 >= b.1 && (a.0 < b.0 || a.1 > b.1);
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0.is_finite() && points[i].1.is_finite())
        .filter(|&i| !points.iter().any(|&p| p.0.is_finite() && p.1.is_finite() && beats(p, points[i])))
        .collect();
    front.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(a.cmp(&b)));
    front
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_undominated_points() {
        let pts = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.1), (2.0, 0.7), (f64::NAN, 1.0)];
        // (1.5, 0.4) loses to (1.0, 0.5); (3.0, 0.7) to (2.0, 0.7); equal points both stay.
        assert_eq!(pareto_front(&pts), vec![4, 0, 1, 5]);
        assert!(pareto_front(&[]).is_empty());
    }
}
