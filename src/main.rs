//! The `segue` binary: settings, logs, then the application until a signal stops it.
//! `segue seed-demo` instead loads the demo catalog into the configured store;
//! `segue blocks list | add ADDRESS [--ttl SECS] | remove ADDRESS` lists and changes the
//! blocked client addresses in the store (running replicas pick changes up within 2 s);
//! `segue jobs status | dead list | dead retry ID | dead drop ID` reads the job queues in
//! Redis and handles their dead letters; `segue backup now | list | restore KEY --into
//! DATABASE_URL_OR_SQLITE_PATH [--force]` backs the store up and restores it
//! (`docs/operations.md`).

use std::process::ExitCode;

use segue::error::chain;
use segue::settings::Settings;
use segue::startup::Application;
use segue::telemetry;

fn main() -> ExitCode {
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("segue: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&settings);
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {}
        Some("seed-demo") => return seed_demo(settings),
        Some("blocks") => return blocks(settings, std::env::args().skip(2).collect()),
        Some("jobs") => return jobs(settings, std::env::args().skip(2).collect()),
        Some("backup") => return backup(settings, std::env::args().skip(2).collect()),
        Some(other) => {
            eprintln!(
                "segue: unknown command {other:?}; commands: serve (the default), seed-demo, blocks, jobs, backup"
            );
            return ExitCode::from(2);
        }
    }
    let outcome = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await.map_err(|e| chain(&e))?;
        app.run_until_stopped().await.map_err(|e| chain(&e))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("segue: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `segue seed-demo`: loads the demo catalog into the configured store and exits.
fn seed_demo(settings: Settings) -> ExitCode {
    let outcome = actix_web::rt::System::new().block_on(async move {
        let store = segue::store::Store::connect(&settings)
            .await
            .map_err(|e| chain(&e))?;
        segue::demo::seed(&store).await.map_err(|e| chain(&e))
    });
    match outcome {
        Ok(count) => {
            println!("segue: the demo catalog is in the store ({count} tracks)");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("segue: {error}");
            ExitCode::FAILURE
        }
    }
}

const BLOCKS_USAGE: &str = "usage: segue blocks list | add ADDRESS [--ttl SECS] | remove ADDRESS";

/// What `segue blocks` was asked to do.
enum BlocksCommand {
    List,
    Add { address: String, ttl_secs: u64 },
    Remove { address: String },
}

fn parse_blocks(args: &[String], default_ttl: u64) -> Result<BlocksCommand, String> {
    let address = |raw: &str| segue::http::admin::parse_address(raw).map_err(|e| e.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => Ok(BlocksCommand::List),
        ["add", raw] => Ok(BlocksCommand::Add {
            address: address(raw)?,
            ttl_secs: default_ttl,
        }),
        ["add", raw, "--ttl", secs] => {
            let ttl_secs = secs
                .parse::<u64>()
                .ok()
                .filter(|secs| (1..=segue::http::admin::MAX_BLOCK_SECS).contains(secs))
                .ok_or("--ttl must be 1 to 2592000 seconds")?;
            Ok(BlocksCommand::Add {
                address: address(raw)?,
                ttl_secs,
            })
        }
        ["remove", raw] => Ok(BlocksCommand::Remove {
            address: address(raw)?,
        }),
        _ => Err(BLOCKS_USAGE.to_owned()),
    }
}

/// `segue blocks …`: the blocked client addresses, in the store every replica reads.
fn blocks(settings: Settings, args: Vec<String>) -> ExitCode {
    use segue::store::blocks as stored;
    let command = match parse_blocks(&args, settings.ip_block_secs) {
        Ok(command) => command,
        Err(problem) => {
            eprintln!("segue: {problem}");
            return ExitCode::from(2);
        }
    };
    let outcome: Result<String, String> = actix_web::rt::System::new().block_on(async move {
        let store = segue::store::Store::connect(&settings)
            .await
            .map_err(|e| chain(&e))?;
        let mut pooled = store.conn().await.map_err(|e| chain(&e))?;
        let mut conn = pooled.conn();
        let now = segue::store::now();
        match command {
            BlocksCommand::List => {
                let active = stored::active(&mut conn, now)
                    .await
                    .map_err(|e| chain(&e))?;
                for block in &active {
                    println!(
                        "{}\tuntil {}\t{}",
                        block.address,
                        block.until.and_utc().to_rfc3339(),
                        block.reason
                    );
                }
                Ok(format!("{} blocked", active.len()))
            }
            BlocksCommand::Add { address, ttl_secs } => {
                let seconds = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
                let until = now + chrono::TimeDelta::seconds(seconds);
                stored::block(&mut conn, &address, until, "operator")
                    .await
                    .map_err(|e| chain(&e))?;
                Ok(format!(
                    "{address} blocked until {}",
                    until.and_utc().to_rfc3339()
                ))
            }
            BlocksCommand::Remove { address } => {
                let lifted = stored::unblock(&mut conn, &address)
                    .await
                    .map_err(|e| chain(&e))?;
                Ok(if lifted {
                    format!("{address} unblocked")
                } else {
                    format!("{address} was not blocked")
                })
            }
        }
    });
    match outcome {
        Ok(said) => {
            println!("segue: {said}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("segue: {error}");
            ExitCode::FAILURE
        }
    }
}

const JOBS_USAGE: &str = "usage: segue jobs status | dead list | dead retry ID | dead drop ID";

/// What `segue jobs` was asked to do.
enum JobsCommand {
    Status,
    DeadList,
    Retry(u64),
    Drop(u64),
}

fn parse_jobs(args: &[String]) -> Result<JobsCommand, String> {
    let id = |raw: &str| {
        raw.parse::<u64>()
            .map_err(|_| format!("{raw:?} is not a job id (a whole number)"))
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["status"] => Ok(JobsCommand::Status),
        ["dead", "list"] => Ok(JobsCommand::DeadList),
        ["dead", "retry", raw] => Ok(JobsCommand::Retry(id(raw)?)),
        ["dead", "drop", raw] => Ok(JobsCommand::Drop(id(raw)?)),
        _ => Err(JOBS_USAGE.to_owned()),
    }
}

/// `segue jobs …`: the job queues in Redis, as every replica sees them.
fn jobs(settings: Settings, args: Vec<String>) -> ExitCode {
    use secrecy::ExposeSecret;
    use segue::jobs::{JobMetrics, Jobs, RedisJobs};
    let command = match parse_jobs(&args) {
        Ok(command) => command,
        Err(problem) => {
            eprintln!("segue: {problem}");
            return ExitCode::from(2);
        }
    };
    let Some(url) = settings.redis_url.clone() else {
        eprintln!(
            "segue: without REDIS_URL each hub runs its jobs in its own process; ask that hub: \
             GET /admin/jobs with the operator token"
        );
        return ExitCode::from(2);
    };
    let outcome: Result<String, String> = actix_web::rt::System::new().block_on(async move {
        let client = redis::Client::open(url.expose_secret()).map_err(|e| chain(&e))?;
        let metrics = JobMetrics::register(&prometheus::Registry::new()).map_err(|e| chain(&e))?;
        let jobs = Jobs::Redis(
            RedisJobs::client(client, &settings.redis_namespace, metrics).map_err(|e| chain(&e))?,
        );
        match command {
            JobsCommand::Status => {
                let status = jobs.status().await.map_err(|e| chain(&e))?;
                for queue in &status.queues {
                    println!(
                        "{:<9} waiting {:>8}   in flight {:>6}",
                        queue.priority.name(),
                        queue.waiting,
                        queue.in_flight
                    );
                }
                println!("delayed {}", status.delayed);
                println!("dead {}", status.dead);
                Ok(format!(
                    "scheduler leader: {}",
                    status.leader.as_deref().unwrap_or("none")
                ))
            }
            JobsCommand::DeadList => {
                let dead = jobs.dead(10_000).await.map_err(|e| chain(&e))?;
                for job in &dead {
                    println!(
                        "{}\t{}\t{}\tattempts {}\t{}\t{}",
                        job.id,
                        job.kind,
                        job.priority.name(),
                        job.attempts,
                        job.error,
                        job.payload
                    );
                }
                Ok(format!("{} dead", dead.len()))
            }
            JobsCommand::Retry(id) => match jobs.retry_dead(id).await.map_err(|e| chain(&e))? {
                true => Ok(format!("job {id} is back in its queue")),
                false => Err(format!("no dead job has id {id}")),
            },
            JobsCommand::Drop(id) => match jobs.drop_dead(id).await.map_err(|e| chain(&e))? {
                true => Ok(format!("dead job {id} dropped")),
                false => Err(format!("no dead job has id {id}")),
            },
        }
    });
    match outcome {
        Ok(said) => {
            println!("segue: {said}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("segue: {error}");
            ExitCode::FAILURE
        }
    }
}

const BACKUP_USAGE: &str =
    "usage: segue backup now | list | restore KEY --into DATABASE_URL_OR_SQLITE_PATH [--force]";

/// What `segue backup` was asked to do.
#[derive(Debug, PartialEq, Eq)]
enum BackupCommand {
    Now,
    List,
    Restore {
        key: String,
        into: String,
        force: bool,
    },
}

fn parse_backup(args: &[String]) -> Result<BackupCommand, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["now"] => Ok(BackupCommand::Now),
        ["list"] => Ok(BackupCommand::List),
        ["restore", key, "--into", into] => Ok(BackupCommand::Restore {
            key: (*key).to_owned(),
            into: (*into).to_owned(),
            force: false,
        }),
        ["restore", key, "--into", into, "--force"]
        | ["restore", key, "--force", "--into", into] => Ok(BackupCommand::Restore {
            key: (*key).to_owned(),
            into: (*into).to_owned(),
            force: true,
        }),
        _ => Err(BACKUP_USAGE.to_owned()),
    }
}

/// `segue backup …`: a backup of the configured store now, the backups kept, or a restore.
fn backup(settings: Settings, args: Vec<String>) -> ExitCode {
    let command = match parse_backup(&args) {
        Ok(command) => command,
        Err(problem) => {
            eprintln!("segue: {problem}");
            return ExitCode::from(2);
        }
    };
    let outcome: Result<String, String> = actix_web::rt::System::new().block_on(async move {
        let metrics = segue::telemetry::Metrics::new().map_err(|e| chain(&e))?;
        let backups = settings.backups(metrics.backups).map_err(|e| chain(&e))?;
        match command {
            BackupCommand::Now => {
                let done = backups
                    .run(chrono::Utc::now())
                    .await
                    .map_err(|e| chain(&e))?;
                for deleted in &done.deleted {
                    println!("deleted {deleted}");
                }
                Ok(format!(
                    "backed up to {} ({} bytes in {:.1} s)",
                    done.key,
                    done.bytes,
                    done.took.as_secs_f64()
                ))
            }
            BackupCommand::List => {
                let found = backups.list().await.map_err(|e| chain(&e))?;
                for backup in &found {
                    println!("{}\t{}", backup.key, backup.taken_at.and_utc().to_rfc3339());
                }
                Ok(format!("{} backups", found.len()))
            }
            BackupCommand::Restore { key, into, force } => {
                backups
                    .restore(&key, &into, force)
                    .await
                    .map_err(|e| chain(&e))?;
                Ok(format!("restored {key} into the target"))
            }
        }
    });
    match outcome {
        Ok(said) => {
            println!("segue: {said}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("segue: {error}");
            ExitCode::FAILURE
        }
    }
}
