//! AFL++ target: [`shoal_h1::fuzzing::request_head`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        shoal_h1::fuzzing::request_head(data);
    });
}
