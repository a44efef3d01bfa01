//! The `segue` binary: settings, logs, then the application until a signal stops it.

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
