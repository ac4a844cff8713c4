//! The store's promises: atomic commit, no half entries, one writer per key, gc, bundles.

use std::collections::BTreeSet;
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use distillery_cache::{CacheKey, CommitInfo, Pin, Store};

fn info(step: &str) -> CommitInfo {
    CommitInfo {
        op: "test".into(),
        op_version: 1,
        step: step.into(),
        ..Default::default()
    }
}

#[test]
fn commit_makes_an_entry_with_hashed_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = CacheKey::of_bytes(b"k");
    assert!(store.get(&key).unwrap().is_none());
    let partial = store.begin(&key).unwrap();
    fs::create_dir_all(partial.data_dir().join("sub")).unwrap();
    fs::write(partial.data_dir().join("sub/a.bin"), b"abc").unwrap();
    fs::write(partial.data_dir().join("b.txt"), b"hello").unwrap();
    // Not visible before the commit.
    assert!(store.get(&key).unwrap().is_none());
    let entry = partial.commit(info("s")).unwrap();
    assert_eq!(entry.manifest.files.len(), 2);
    assert_eq!(entry.manifest.files[0].path, "b.txt");
    assert_eq!(entry.manifest.files[1].path, "sub/a.bin");
    assert_eq!(
        entry.manifest.files[1].blake3,
        blake3::hash(b"abc").to_hex().to_string()
    );
    assert_eq!(entry.manifest.total_size(), 8);
    assert!(entry.manifest.finished.is_some());
    assert_eq!(store.get(&key).unwrap().unwrap().manifest.key, key);
    assert!(store.verify(&mut |_| {}).unwrap().is_empty());
}

#[test]
fn dropped_partial_leaves_nothing_and_dead_partials_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = CacheKey::of_bytes(b"k");
    {
        let partial = store.begin(&key).unwrap();
        fs::write(partial.data_dir().join("x"), b"1").unwrap();
    }
    assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    assert!(store.get(&key).unwrap().is_none());
    // A partial of a dead process of this host (pid 999999999 does not exist).
    let host = distillery_cache::store::hostname();
    let stale = dir
        .path()
        .join("partial")
        .join(format!("{}.{}.999999999.1", key, host));
    fs::create_dir_all(stale.join("data")).unwrap();
    // A live one (ours) is kept.
    let live = store.begin(&key).unwrap();
    let removed = store.sweep_partials().unwrap();
    assert_eq!(removed, vec![stale.clone()]);
    assert!(live.data_dir().exists());
}

#[test]
fn verify_finds_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = CacheKey::of_bytes(b"k");
    let partial = store.begin(&key).unwrap();
    fs::write(partial.data_dir().join("a"), b"abc").unwrap();
    let entry = partial.commit(info("s")).unwrap();
    fs::write(entry.data_dir().join("a"), b"abd").unwrap();
    fs::write(entry.data_dir().join("extra"), b"").unwrap();
    let problems = store.verify(&mut |_| {}).unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.path == "a" && p.problem.contains("content changed"))
    );
    assert!(problems.iter().any(|p| p.path == "extra"));
}

#[test]
fn one_writer_per_key_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = CacheKey::of_bytes(b"shared");
    let runs = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let runs = runs.clone();
            std::thread::spawn(move || {
                let _lock = store
                    .lock(&key, Duration::from_secs(30), &mut |_| {})
                    .unwrap();
                if store.get(&key).unwrap().is_none() {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let p = store.begin(&key).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    fs::write(p.data_dir().join("x"), b"1").unwrap();
                    p.commit(info("s")).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn lock_times_out_and_reports_dead_holders() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = CacheKey::of_bytes(b"k");
    let held = store
        .lock(&key, Duration::from_secs(1), &mut |_| {})
        .unwrap();
    assert!(held.broken_from.is_none());
    let mut waited = false;
    let err = store
        .lock(&key, Duration::from_millis(200), &mut |_| waited = true)
        .unwrap_err();
    assert!(waited);
    assert!(err.to_string().contains("timed out"), "{err}");
    drop(held);
    // A lock file left with a dead holder's pid: taken, and reported.
    let host = distillery_cache::store::hostname();
    fs::write(
        dir.path().join("locks").join(format!("{key}.lock")),
        format!("pid 999999999 host {host}"),
    )
    .unwrap();
    let lock = store
        .lock(&key, Duration::from_secs(1), &mut |_| {})
        .unwrap();
    assert!(lock.broken_from.clone().unwrap().contains("999999999"));
}

#[test]
fn gc_keeps_pins_and_respects_a_size_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("c")).unwrap();
    let keys: Vec<CacheKey> = (0..3u8).map(|i| CacheKey::of_bytes(&[i])).collect();
    for (i, key) in keys.iter().enumerate() {
        let p = store.begin(key).unwrap();
        fs::write(p.data_dir().join("x"), vec![0u8; 100 * (i + 1)]).unwrap();
        p.commit(info(&format!("s{i}"))).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let lock_file = dir.path().join("r.lock");
    fs::write(&lock_file, "").unwrap();
    store
        .pin(
            "r",
            &Pin {
                name: "r".into(),
                lock_file: Some(lock_file.clone()),
                keys: [keys[0]].into(),
            },
        )
        .unwrap();
    let dry = store.gc(&BTreeSet::new(), None, true).unwrap();
    assert_eq!(dry.freed_bytes, 500);
    assert_eq!(store.entries().unwrap().len(), 3);
    // Budget of 400 bytes: removes the oldest unpinned (200) only.
    let r = store.gc(&BTreeSet::new(), Some(400), false).unwrap();
    assert_eq!(r.freed_bytes, 200);
    assert!(store.contains(&keys[0]) && !store.contains(&keys[1]) && store.contains(&keys[2]));
    // The lock file is gone (another branch, say): the pin still holds, through dry runs too.
    fs::remove_file(&lock_file).unwrap();
    let pins_before = fs::read_dir(dir.path().join("c/pins")).unwrap().count();
    store.gc(&BTreeSet::new(), None, true).unwrap();
    assert_eq!(
        fs::read_dir(dir.path().join("c/pins")).unwrap().count(),
        pins_before
    );
    let r = store.gc(&BTreeSet::new(), None, false).unwrap();
    assert_eq!(r.freed_bytes, 300);
    assert!(store.contains(&keys[0]));
    // Released only by an explicit unpin; a dry unpin removes nothing.
    let missing = |p: &Pin| p.file_gone();
    assert_eq!(store.unpin(&missing, true).unwrap().len(), 1);
    assert_eq!(store.pins().unwrap().len(), 1);
    assert_eq!(store.unpin(&missing, false).unwrap().len(), 1);
    let r = store.gc(&BTreeSet::new(), None, false).unwrap();
    assert_eq!(r.freed_bytes, 100);
    assert!(store.entries().unwrap().is_empty());
}

#[test]
fn bundles_round_trip_and_reject_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(dir.path().join("a")).unwrap();
    let b = Store::open(dir.path().join("b")).unwrap();
    let key = CacheKey::of_bytes(b"k");
    let p = a.begin(&key).unwrap();
    fs::write(p.data_dir().join("w.bin"), b"weights").unwrap();
    p.commit(info("s")).unwrap();
    let bundle = dir.path().join("bundle");
    a.export_bundle(&[key], &bundle, serde_json::json!({"recipe": "x"}))
        .unwrap();
    // Tampered copy is refused.
    let bad = dir.path().join("bad");
    distillery_cache::materialize_dir(&bundle, &bad).unwrap();
    fs::remove_file(bad.join("entries").join(key.to_hex()).join("data/w.bin")).unwrap();
    fs::write(
        bad.join("entries").join(key.to_hex()).join("data/w.bin"),
        b"weightz",
    )
    .unwrap();
    let err = b.import_bundle(&bad).unwrap_err();
    assert!(err.to_string().contains("content changed"), "{err}");
    assert!(!b.contains(&key));
    assert_eq!(b.import_bundle(&bundle).unwrap(), vec![key]);
    let entry = b.get(&key).unwrap().unwrap();
    assert_eq!(
        fs::read(entry.data_dir().join("w.bin")).unwrap(),
        b"weights"
    );
    assert!(b.verify(&mut |_| {}).unwrap().is_empty());
}
