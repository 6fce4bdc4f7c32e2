//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, seeds and
//! what `bench/fuzz.sh` found worth keeping) through the same checks the
//! fuzz targets run, so every `cargo test` repeats every fuzz run's
//! inputs on the current code.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let caught = std::panic::catch_unwind(|| run(&data));
        assert!(caught.is_ok(), "{} fails its fuzz check", path.display());
        n += 1;
    }
    assert!(n > 0, "{}: an empty corpus replays nothing", dir.display());
    println!("{target}: {n} inputs replayed");
}

#[test]
fn request_head_corpus() {
    replay("request_head", shoal_h1::fuzzing::request_head);
}

#[test]
fn chunked_corpus() {
    replay("chunked", shoal_h1::fuzzing::chunked);
}

#[test]
fn response_corpus() {
    replay("response", shoal_h1::fuzzing::response);
}
