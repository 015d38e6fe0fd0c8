//! Quick timing of candidate layer-1 formulations (not a benchmark; see benches/).
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn main() {
    let _g = tch::no_grad_guard();
    let threads: i32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    println!("threads {}", tch::get_num_threads());
    for &n in &[30i64, 100, 500] {
        let w1 = Tensor::randn([n, 128, 2560], (Kind::Float, Device::Cpu));
        let b1 = Tensor::randn([n, 128, 1], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2560, 1], (Kind::Float, Device::Cpu));
        let time = |name: &str, f: &dyn Fn() -> Tensor| {
            for _ in 0..3 {
                let _ = f();
            }
            let mut v = vec![];
            for _ in 0..20 {
                let t = Instant::now();
                let _ = f();
                v.push(t.elapsed().as_secs_f64() * 1e3);
            }
            v.sort_by(f64::total_cmp);
            let gbs = (n * 128 * 2560 * 4) as f64 / (v[10] / 1e3) / 1e9;
            println!("S={n} {name}: median {:.3} ms ({gbs:.1} GB/s)", v[10]);
        };
        time("sum (read bw)", &|| w1.sum(Kind::Float));
        time("baddbmm expand", &|| b1.baddbmm(&w1, &x.unsqueeze(0).expand([n, -1, 1], false), 1, 1));
        time("mv flat", &|| w1.view([-1, 2560]).mv(&x.view([-1])));
        time("matmul row", &|| x.view([1, 2560]).matmul(&w1.view([-1, 2560]).tr()));
    }
}
