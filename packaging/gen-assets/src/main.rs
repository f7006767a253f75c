//! `svq-gen-assets OUT_DIR`: man pages (svqd.8, svqctl.1) and bash/zsh/fish completions for
//! both commands, generated from their clap definitions (`svqd::cli`), for the Debian package
//! (`scripts/package-deb.sh`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::{generate_to, Shell};
use svqd::cli::{Cli, SvqctlCli};

fn write(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    for (mut cmd, section) in [(Cli::command(), "8"), (SvqctlCli::command(), "1")] {
        let name = cmd.get_name().to_owned();
        let page = clap_mangen::Man::new(cmd.clone()).section(section);
        let mut buf = Vec::new();
        page.render(&mut buf)?;
        std::fs::write(man.join(format!("{name}.{section}")), buf)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            generate_to(shell, &mut cmd, name.clone(), &completions)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: svq-gen-assets OUT_DIR");
        return ExitCode::from(2);
    };
    match write(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svq-gen-assets: {e}");
            ExitCode::FAILURE
        }
    }
}
