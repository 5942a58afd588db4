// `sqlx::migrate!` embeds the migrations at compile time; without this a new
// migration file is not picked up until the crate's sources change.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
