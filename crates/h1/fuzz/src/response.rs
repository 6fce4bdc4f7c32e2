//! AFL++ target: [`shoal_h1::fuzzing::response`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        shoal_h1::fuzzing::response(data);
    });
}
