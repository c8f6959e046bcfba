//! Rebuild when the page changes: `include_dir!` embeds `www/`, but on stable Rust it cannot tell
//! Cargo which files it read.
fn main() {
    println!("cargo:rerun-if-changed=www");
}
