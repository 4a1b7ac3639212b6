//! `id06d`: the command line is in [`id06d::cli`].

fn main() -> std::process::ExitCode {
    id06d::cli::main()
}
