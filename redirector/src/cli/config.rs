//! `config check`: validating an agent configuration without starting anything.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;

use super::render::Report;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check FILE without starting anything: one line per problem.
    Check { file: PathBuf },
}

impl ConfigCmd {
    pub(super) fn execute(self) -> anyhow::Result<Report> {
        let Self::Check { file } = self;
        match Config::load(&file)?.validate() {
            Ok(cfg) => Ok(Report::ConfigOk { node: cfg.node.clone(), siblings: cfg.siblings.len(), services: cfg.services.len(), file }),
            Err(invalid) => {
                // The problems go with the error, on stderr, one line each for the file's author.
                for p in &invalid.problems {
                    eprintln!("{}: {p}", file.display());
                }
                bail!("{}: {} problem(s)", file.display(), invalid.problems.len());
            }
        }
    }
}
