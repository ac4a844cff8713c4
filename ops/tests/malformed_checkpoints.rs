//! Broken checkpoints are clear errors that name the file and the problem, never a panic.

use std::path::{Path, PathBuf};

use distillery_ops::model::checkpoint::load_model;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/llama-gqa-tied-f32")
}

/// A copy of the tiny golden model whose safetensors file is rewritten by `edit(header, data)`.
fn broken(
    edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>) -> Option<Vec<u8>>,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(golden().join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(golden().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    let file = match edit(&mut header, &mut data) {
        Some(raw) => raw,
        None => {
            let h = serde_json::to_vec(&header).unwrap();
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            out
        }
    };
    std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
    let err = match load_model(dir.path()) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    (dir, err)
}

#[test]
fn truncated_file() {
    let (_d, e) = broken(|_, data| {
        data.truncate(data.len() - 100);
        None
    });
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn header_length_past_the_end() {
    let (_d, e) = broken(|_, _| {
        let mut raw = std::fs::read(golden().join("model.safetensors")).unwrap();
        raw[..8].copy_from_slice(&(50_000_000u64).to_le_bytes());
        Some(raw)
    });
    assert!(e.contains("runs past the end of the file"), "{e}");
}

#[test]
fn overlapping_offsets() {
    let (_d, e) = broken(|h, _| {
        let obj = h.as_object_mut().unwrap();
        let name = obj
            .keys()
            .find(|k| k.ends_with("q_proj.weight"))
            .unwrap()
            .clone();
        let off = obj[&name]["data_offsets"].clone();
        let (s, t) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
        obj.get_mut(&name).unwrap()["data_offsets"] =
            serde_json::json!([s.saturating_sub(16), t.saturating_sub(16)]);
        None
    });
    eprintln!("{e}");
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn unknown_dtype() {
    let (_d, e) = broken(|h, _| {
        let obj = h.as_object_mut().unwrap();
        let name = obj
            .keys()
            .find(|k| k.ends_with("norm.weight"))
            .unwrap()
            .clone();
        obj.get_mut(&name).unwrap()["dtype"] = "Q9".into();
        None
    });
    eprintln!("{e}");
    assert!(e.contains("not understood"), "{e}");
}

#[test]
fn a_dtype_distillery_does_not_read() {
    let (_d, e) = broken(|h, _| {
        let obj = h.as_object_mut().unwrap();
        let name = "model.norm.weight".to_string();
        let off = obj[&name]["data_offsets"].clone();
        // 64 f32 = 256 bytes = 256 I8: a valid file, just not a float tensor.
        obj.get_mut(&name).unwrap()["dtype"] = "I8".into();
        obj.get_mut(&name).unwrap()["shape"] =
            serde_json::json!([off[1].as_u64().unwrap() - off[0].as_u64().unwrap()]);
        None
    });
    assert!(e.contains("distillery reads F32, F16 and BF16"), "{e}");
}

#[test]
fn shape_that_disagrees_with_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        golden().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("config.json")).unwrap())
            .unwrap();
    cfg["intermediate_size"] = 100.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_model(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("has shape [96, 64] but config.json implies [100, 64]"),
        "{e}"
    );
}

#[test]
fn gguf_with_an_unknown_tensor_type() {
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes()); // version
    f.extend(1u64.to_le_bytes()); // tensors
    f.extend(0u64.to_le_bytes()); // metadata entries
    let name = b"token_embd.weight";
    f.extend((name.len() as u64).to_le_bytes());
    f.extend(name);
    f.extend(2u32.to_le_bytes());
    f.extend(32u64.to_le_bytes());
    f.extend(4u64.to_le_bytes());
    f.extend(99u32.to_le_bytes()); // no such ggml type
    f.extend(0u64.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, &f).unwrap();
    let e = load_model(&p).err().unwrap().to_string();
    assert!(
        e.contains("m.gguf") && e.contains("ggml type id 99") && e.contains("IQ2_XXS"),
        "{e}"
    );
    // Truncated inside the header.
    std::fs::write(&p, &f[..30]).unwrap();
    let e = load_model(&p).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
    // Not GGUF at all.
    std::fs::write(&p, b"hello").unwrap();
    assert!(
        load_model(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("not a GGUF file")
    );
}
