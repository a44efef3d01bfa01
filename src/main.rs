//! The `segue` binary: settings, logs, then the application until a signal stops it.
//! `segue seed-demo` instead loads the demo catalog into the configured store.

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
        Some(other) => {
            eprintln!("segue: unknown command {other:?}; commands: serve (the default), seed-demo");
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
