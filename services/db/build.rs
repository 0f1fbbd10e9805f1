// `sqlx::migrate!` embeds the files of `migrations/` at compile time; a new
// file must rebuild this crate.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
