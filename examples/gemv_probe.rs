use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
fn main() {
    let _g = tch::no_grad_guard();
    for s in [14i64, 30, 100, 500] {
        let (rows, d) = (s * 128, 2560);
        let w = Tensor::randn([rows, d], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([d], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([rows], (Kind::Float, Device::Cpu));
        let bytes = (rows * d * 4) as f64;
        let (tx, rx) = std::sync::mpsc::channel::<(Tensor, Tensor, Tensor, std::sync::mpsc::Sender<Tensor>)>();
        std::thread::spawn(move || {
            let _g = tch::no_grad_guard();
            for (b, w, x, back) in rx {
                back.send(b.addmv(&w, &x)).unwrap();
            }
        });
        let mut t_mv = vec![];
        let mut t_par = vec![];
        for _ in 0..100 {
            let t = Instant::now();
            let y1 = b.addmv(&w, &x);
            t_mv.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let half = rows / 2;
            let (bt, rt) = std::sync::mpsc::channel();
            tx.send((b.narrow(0, half, rows - half), w.narrow(0, half, rows - half), x.shallow_clone(), bt)).unwrap();
            let top = b.narrow(0, 0, half).addmv(&w.narrow(0, 0, half), &x);
            let bottom = rt.recv().unwrap();
            let y2 = Tensor::cat(&[top, bottom], 0);
            t_par.push(t.elapsed().as_secs_f64());
            assert!(y1.allclose(&y2, 1e-5, 1e-5, false));
        }
        for (name, v) in [("addmv", t_mv), ("2 halves", t_par)] {
            let m = med(v);
            println!("S={s} {name:10} {:.3} ms  {:.1} GB/s", m * 1e3, bytes / m / 1e9);
        }
    }
}
