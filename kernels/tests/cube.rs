//! The CubeCL kernels against their references: on CUDA with `--features cuda`, else on wgpu
//! (lavapipe, a software Vulkan, in CI). They need a device: without one they say so and pass,
//! unless `DISTILLERY_REQUIRE_GPU=1` (`.ci/run` sets it for lavapipe, `scripts/gpu-check.sh` for
//! CUDA), which makes a missing device a failure.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor, TensorData, TensorPrimitive};
use distillery_kernels::importance::accumulate_reference;
use distillery_kernels::kl::{kl_loss, kl_reference};
use distillery_kernels::{KernelBackend, KlDirection};

#[cfg(feature = "cuda")]
type W = burn::backend::Cuda<f32, i32>;
#[cfg(not(feature = "cuda"))]
type W = burn::backend::Wgpu<f32, i32, u32>;
type Device = burn::tensor::Device<W>;

/// The device, or None (with a note) when this machine has none.
fn device() -> Option<Device> {
    let probe =
        std::panic::catch_unwind(|| Tensor::<W, 1>::zeros([1], &Device::default()).into_data());
    match probe {
        Ok(_) => Some(Device::default()),
        Err(_) if std::env::var("DISTILLERY_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!(
                "DISTILLERY_REQUIRE_GPU=1 but there is no device (wgpu: install mesa-vulkan-drivers; cuda: a driver)"
            )
        }
        Err(_) => {
            eprintln!("skipped: no device (wgpu: install mesa-vulkan-drivers for lavapipe)");
            None
        }
    }
}

/// Same values on both backends.
fn pair<const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &Device,
) -> (Tensor<Flex, D>, Tensor<W, D>) {
    let host =
        Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, std), &Default::default());
    let data = host.to_data();
    (host, Tensor::from_data(data, device))
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= rel * b.abs().max(1.0),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn importance_kernel_equals_the_reference() {
    let Some(device) = device() else { return };
    // d not a multiple of the 32 channels per cube, seq not a multiple of the 8 lanes.
    for [b, s, d] in [[3, 37, 70], [2, 300, 1000], [1, 1, 5]] {
        let (act_h, act_w) = pair([b, s, d], 2.0, &device);
        let (acc_h, acc_w) = pair([d], 1.0, &device);
        let acc_h = acc_h.abs();
        let acc_w = acc_w.abs();
        let want = values(accumulate_reference(acc_h, act_h));
        let got = W::importance_accumulate(
            acc_w.into_primitive().tensor(),
            act_w.into_primitive().tensor(),
        );
        let got = values(Tensor::<W, 1>::from_primitive(TensorPrimitive::Float(got)));
        assert_close(&got, &want, 1e-5, &format!("importance [{b}, {s}, {d}]"));
    }
}

#[test]
fn kl_kernel_equals_the_reference_loss_and_gradient() {
    let Some(device) = device() else { return };
    // vocab not a multiple of the 256 units per row.
    let (rows, vocab) = (7, 1000);
    let (t_h, t_w) = pair([rows, vocab], 3.0, &device);
    let (s_h, s_w) = pair([rows, vocab], 3.0, &device);
    for direction in [KlDirection::Forward, KlDirection::Reverse] {
        for temperature in [1.0, 2.0] {
            let what = format!("{direction:?} T={temperature}");
            // Reference: autodiff over plain tensor ops on the CPU.
            let s_ad = Tensor::<Autodiff<Flex>, 2>::from_inner(s_h.clone()).require_grad();
            let loss = kl_reference(
                Tensor::from_inner(t_h.clone()),
                s_ad.clone(),
                temperature,
                direction,
            );
            let grads = loss.backward();
            let want_grad = values(s_ad.grad(&grads).unwrap());
            let want_loss = values(loss)[0];

            let s_w_ad = Tensor::<Autodiff<W>, 2>::from_inner(s_w.clone()).require_grad();
            let loss = kl_loss(t_w.clone(), s_w_ad.clone(), temperature, direction);
            let grads = loss.backward();
            let got_grad = values(s_w_ad.grad(&grads).unwrap());
            let got_loss = values(loss)[0];
            assert_close(&[got_loss], &[want_loss], 1e-5, &format!("{what} loss"));
            assert_close(&got_grad, &want_grad, 1e-5, &format!("{what} gradient"));
        }
    }
}

#[test]
fn kl_kernel_gradient_matches_finite_differences() {
    let Some(device) = device() else { return };
    let (rows, vocab) = (2, 9);
    let t: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let s: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.25)
        .collect();
    let tensor = |v: &[f32]| {
        Tensor::<W, 2>::from_data(TensorData::new(v.to_vec(), [rows, vocab]), &device)
            .into_primitive()
            .tensor()
    };
    for direction in [KlDirection::Forward, KlDirection::Reverse] {
        let loss = |s: &[f32]| {
            let (l, _) = W::kl_rows(tensor(&t), tensor(s), 1.0, direction, 1.0);
            values(Tensor::<W, 1>::from_primitive(TensorPrimitive::Float(l)))
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>()
        };
        let (_, g) = W::kl_rows(tensor(&t), tensor(&s), 1.0, direction, 1.0);
        let g = values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(g)));
        let (_, host) = distillery_kernels::kl::kl_rows_host(&t, &s, vocab, 1.0, direction, 1.0);
        assert_close(
            &g,
            &host,
            1e-5,
            &format!("{direction:?} gradient against the host loop"),
        );
        let h = 1e-2f32;
        for i in 0..rows * vocab {
            let (mut up, mut down) = (s.clone(), s.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up) - loss(&down)) / (2.0 * h as f64);
            assert!(
                (fd as f32 - g[i]).abs() < 2e-3,
                "{direction:?} i={i}: fd {fd} vs {}",
                g[i]
            );
        }
    }
}

#[test]
fn kl_kernel_covers_more_rows_than_one_grid_axis() {
    let Some(device) = device() else { return };
    // 32768 rows per grid column: this spills into a second one.
    let (rows, vocab) = (32768 + 5, 3);
    let (t_h, t_w) = pair([rows, vocab], 1.0, &device);
    let (s_h, s_w) = pair([rows, vocab], 1.0, &device);
    let (losses, _) = W::kl_rows(
        t_w.into_primitive().tensor(),
        s_w.into_primitive().tensor(),
        1.0,
        KlDirection::Forward,
        1.0,
    );
    let got = values(Tensor::<W, 1>::from_primitive(TensorPrimitive::Float(
        losses,
    )));
    let (want, _) = distillery_kernels::kl::kl_rows_host(
        &values(t_h),
        &values(s_h),
        vocab,
        1.0,
        KlDirection::Forward,
        1.0,
    );
    let want: Vec<f32> = want.into_iter().map(|x| x as f32).collect();
    assert_close(&got, &want, 1e-5, "row losses");
}

/// The attention kernels against whole-matrix autodiff on the CPU: forward and the gradients of
/// q, k and v at odd sizes (head_dim 24, sequence 37, GQA 3:1), plain, with a sliding window,
/// and soft-capped with a window.
#[test]
fn attention_kernels_equal_the_reference_forward_and_gradients() {
    use distillery_kernels::attention::{AttentionSpec, causal_attention, naive_reference};
    use distillery_kernels::fused::AttentionShape;
    let Some(device) = device() else { return };
    let (batch, seq, heads, kv_heads, head_dim) = (2, 37, 6, 2, 24);
    for (window, softcap) in [(None, None), (Some(11), None), (Some(11), Some(5.0))] {
        let spec = AttentionSpec {
            shape: AttentionShape {
                batch,
                seq,
                heads,
                kv_heads,
                head_dim,
                window,
            },
            scale: (head_dim as f32).powf(-0.5),
            softcap,
        };
        let what = format!("window {window:?}, softcap {softcap:?}");
        let (q_h, q_w) = pair([batch, seq, heads, head_dim], 1.0, &device);
        let (k_h, k_w) = pair([batch, seq, kv_heads, head_dim], 1.0, &device);
        let (v_h, v_w) = pair([batch, seq, kv_heads, head_dim], 1.0, &device);
        // The loss weighs every output element differently: a nontrivial upstream gradient.
        let (c_h, c_w) = pair([batch, seq, heads, head_dim], 1.0, &device);

        let leaf = |t: Tensor<Flex, 4>| Tensor::<Autodiff<Flex>, 4>::from_inner(t).require_grad();
        let (q, k, v) = (leaf(q_h), leaf(k_h), leaf(v_h));
        let out = naive_reference(q.clone(), k.clone(), v.clone(), spec);
        let grads = (out.clone() * Tensor::from_inner(c_h)).sum().backward();
        let want = [
            values(out.inner()),
            values(q.grad(&grads).unwrap()),
            values(k.grad(&grads).unwrap()),
            values(v.grad(&grads).unwrap()),
        ];

        let leaf = |t: Tensor<W, 4>| Tensor::<Autodiff<W>, 4>::from_inner(t).require_grad();
        let (q, k, v) = (leaf(q_w), leaf(k_w), leaf(v_w));
        let out = causal_attention(q.clone(), k.clone(), v.clone(), spec);
        let grads = (out.clone() * Tensor::from_inner(c_w)).sum().backward();
        let got = [
            values(out.inner()),
            values(q.grad(&grads).unwrap()),
            values(k.grad(&grads).unwrap()),
            values(v.grad(&grads).unwrap()),
        ];
        for (name, (g, w)) in ["context", "dq", "dk", "dv"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_close(g, w, 1e-4, &format!("{what}: {name}"));
        }
    }
}

/// The output head and the KL kernel a chunk of rows at a time, as the chunked head runs them:
/// the summed loss and the gradients of the hidden states and the head weight equal the whole
/// batch's at once, on the device.
#[test]
fn chunked_head_and_kl_equal_the_whole_on_the_device() {
    let Some(device) = device() else { return };
    let (rows, hidden, vocab, chunk) = (37, 24, 300, 8);
    let (_, h_w) = pair([rows, hidden], 1.0, &device);
    let (_, w_w) = pair([hidden, vocab], 0.3, &device);
    let (_, t_w) = pair([rows, vocab], 2.0, &device);
    let run = |chunked: bool| {
        let h = Tensor::<Autodiff<W>, 2>::from_inner(h_w.clone()).require_grad();
        let w = Tensor::<Autodiff<W>, 2>::from_inner(w_w.clone()).require_grad();
        let loss = if chunked {
            (0..rows)
                .step_by(chunk)
                .map(|r0| {
                    let r1 = (r0 + chunk).min(rows);
                    let logits = h.clone().slice([r0..r1]).matmul(w.clone());
                    let teacher = t_w.clone().slice([r0..r1]);
                    // kl_loss is each chunk's mean: weighted by its share of the rows.
                    kl_loss(teacher, logits, 2.0, KlDirection::Forward)
                        * ((r1 - r0) as f64 / rows as f64)
                })
                .reduce(|a, b| a + b)
                .unwrap()
        } else {
            kl_loss(
                t_w.clone(),
                h.clone().matmul(w.clone()),
                2.0,
                KlDirection::Forward,
            )
        };
        let grads = loss.backward();
        (
            values(loss.inner()),
            values(h.grad(&grads).unwrap()),
            values(w.grad(&grads).unwrap()),
        )
    };
    let (whole, chunks) = (run(false), run(true));
    assert_close(&chunks.0, &whole.0, 1e-5, "loss");
    assert_close(&chunks.1, &whole.1, 1e-5, "d hidden");
    assert_close(&chunks.2, &whole.2, 1e-5, "d weight");
}
