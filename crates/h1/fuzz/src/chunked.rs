//! AFL++ target: [`shoal_h1::fuzzing::chunked`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        shoal_h1::fuzzing::chunked(data);
    });
}
