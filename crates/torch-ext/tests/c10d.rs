//! c10d through the shim: a Gloo group of two ranks (two threads of this process) sums,
//! reduces onto one rank and broadcasts tensors (waiting at once, or started and waited for).

use std::time::Duration;
use tch::Tensor;
use torch_ext::{have_gloo, Backend, ProcessGroup};

/// Two ranks of one Gloo group, as two threads of this process, meeting on a free port.
#[test]
fn gloo_all_reduce_and_broadcast_across_two_ranks() {
    if !have_gloo() {
        eprintln!("skipped: built without gloo's headers (libgloo-dev)");
        return;
    }
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let rank = |r: usize| {
        std::thread::spawn(move || -> Result<(Vec<f32>, Vec<f32>), String> {
            let t = Duration::from_secs(30);
            let g = ProcessGroup::new("127.0.0.1", port, r, 2, Backend::Gloo, t, t)?;
            let x = Tensor::from_slice(&[1.0f32 + r as f32, 10.0 * (r as f32 + 1.0)]);
            let y = Tensor::from_slice(&[r as f32 + 5.0]);
            g.all_reduce_sum(&[&x, &y])?;
            let b = Tensor::from_slice(&[r as f32 * 100.0 + 7.0]);
            g.broadcast(&[&b], 0)?;
            // Reduced onto rank 1 only (run.shard = "gradients").
            let z = Tensor::from_slice(&[2.0f32 * (r as f32 + 1.0)]);
            let work = g.reduce_sum_start(&z, 1)?;
            g.wait(work)?;
            // Started, then waited for, from rank 1 (run.shard = "full"'s prefetch).
            let c = Tensor::from_slice(&[r as f32 * 10.0 + 3.0, -1.0 - r as f32]);
            let work = g.broadcast_start(&c, 1)?;
            g.wait(work)?;
            g.barrier()?;
            let values = |t: Tensor| Vec::<f32>::try_from(t).map_err(|e| e.to_string());
            let sum = values(x)?;
            let mut rest = values(y)?;
            rest.extend(values(b)?);
            rest.extend(values(c)?);
            if r == 1 {
                rest.extend(values(z)?);
            }
            Ok((sum, rest))
        })
    };
    let (a, b) = (rank(0), rank(1));
    for (r, h) in [a, b].into_iter().enumerate() {
        let (sum, rest) = h.join().expect("rank thread").expect("collectives");
        assert_eq!(sum, vec![3.0, 30.0]);
        // 5 + 6 summed; rank 0's 7 broadcast; rank 1's [13, -2] broadcast; 2 + 4 reduced onto
        // rank 1.
        let want: &[f32] = if r == 1 {
            &[11.0, 7.0, 13.0, -2.0, 6.0]
        } else {
            &[11.0, 7.0, 13.0, -2.0]
        };
        assert_eq!(rest, want);
    }
}

/// ProcessGroupNCCL initialises and reduces on a GPU (a group of one rank: one GPU is enough).
/// Skipped, with a message, without CUDA or without NCCL compiled in.
#[test]
fn nccl_group_of_one_reduces_on_the_gpu() {
    if !torch_ext::have_nccl() || !tch::Cuda::is_available() {
        eprintln!(
            "skipped: NCCL compiled in: {}, CUDA available: {}",
            torch_ext::have_nccl(),
            tch::Cuda::is_available()
        );
        return;
    }
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let t = Duration::from_secs(60);
    let g = ProcessGroup::new("127.0.0.1", port, 0, 1, Backend::Nccl, t, t).expect("NCCL group");
    let x = Tensor::from_slice(&[1.5f32, -2.0]).to_device(tch::Device::Cuda(0));
    g.all_reduce_sum(&[&x]).expect("all-reduce");
    g.broadcast(&[&x], 0).expect("broadcast");
    let work = g.broadcast_start(&x, 0).expect("started broadcast");
    g.wait(work).expect("waited broadcast");
    let v = Vec::<f32>::try_from(x.to_device(tch::Device::Cpu)).expect("values");
    assert_eq!(v, vec![1.5, -2.0]);
}
