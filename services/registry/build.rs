//! `sqlx::migrate!` embeds the migrations when the crate compiles: without this, a migration added on
//! its own would not rebuild the crate, and the binary would run without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
