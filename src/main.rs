//! The `narflow` command.
fn main() {}
