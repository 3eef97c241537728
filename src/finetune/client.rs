//! `contrastive finetune upload|create|watch|get|list|cancel`: the command-line client of
//! FineTuneService. Prints JSON; `watch` shows a progress bar and the metrics as they come.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::datasets::{read_server_folder, DatasetLimits, LabeledImage};
use crate::client::{finetune_client, status_error, AuthChannel};
use crate::proto::v1::fine_tune_service_client::FineTuneServiceClient;
use crate::proto::v1::{
    create_job_request, job_event, CancelJobRequest, CreateJobRequest, DatasetInfo, GetJobRequest, HyperParameters,
    Job, JobState, ListJobsRequest, UploadDatasetChunk, WatchJobRequest,
};

#[derive(Debug, clap::Args)]
pub struct FinetuneArgs {
    /// Server address
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051", env = "CONTRASTIVE_SERVER")]
    pub addr: String,
    /// API key, sent as `authorization: Bearer <key>`
    #[arg(long, global = true, env = "CONTRASTIVE_API_KEY")]
    pub api_key: Option<String>,
    #[command(subcommand)]
    pub command: FinetuneCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FinetuneCommand {
    /// Upload an image folder (`DIR/<class>/*.png|jpg`) as a dataset
    Upload {
        dir: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Create a fine-tune job
    Create(CreateArgs),
    /// Follow a job until it ends (exit 0 when it succeeds)
    Watch {
        job_id: String,
    },
    Get {
        job_id: String,
    },
    List {
        /// queued, validating, running, succeeded, failed or cancelled
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    Cancel {
        job_id: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub base_model: String,
    /// [default: the latest ready]
    #[arg(long, default_value_t = 0)]
    pub base_version: u64,
    /// [default: the base model's name]
    #[arg(long, default_value = "")]
    pub output_model: String,
    /// An uploaded dataset's id
    #[arg(long, group = "source")]
    pub dataset: Option<String>,
    /// An image folder here (`DIR/<class>/*.png|jpg`), uploaded first
    #[arg(long, group = "source")]
    pub data: Option<PathBuf>,
    /// A folder under the server's --finetune-data-root
    #[arg(long, group = "source")]
    pub server_folder: Option<String>,
    /// [default: 90]
    #[arg(long, default_value_t = 0)]
    pub epochs: u32,
    /// [default: 64]
    #[arg(long, default_value_t = 0)]
    pub batch_size: u32,
    /// [default: 0.1]
    #[arg(long, default_value_t = 0.0)]
    pub lr: f64,
    /// [default: 0.1]
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Backbone stages that train, from the top; the rest run as served [default: 1]
    #[arg(long)]
    pub trainable_stages: Option<u32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of each class held out for the before/after evaluation [default: 0.2]
    #[arg(long, default_value_t = 0.0)]
    pub holdout: f64,
    /// Publish even if the held-out k-NN accuracy drops
    #[arg(long)]
    pub allow_worse: bool,
    /// Follow the job after creating it
    #[arg(long)]
    pub watch: bool,
}

pub async fn run(args: FinetuneArgs) -> Result<()> {
    let mut client = finetune_client(&args.addr, args.api_key.as_deref()).await?;
    match args.command {
        FinetuneCommand::Upload { dir, name } => {
            let info = upload(&mut client, &dir, name).await?;
            print(&dataset_json(&info))
        }
        FinetuneCommand::Create(create) => {
            let watch = create.watch;
            let job = create_job(&mut client, create).await?;
            print(&job_json(&job))?;
            if watch {
                return watch_job(&mut client, &job.job_id).await;
            }
            Ok(())
        }
        FinetuneCommand::Watch { job_id } => watch_job(&mut client, &job_id).await,
        FinetuneCommand::Get { job_id } => {
            let job = client.get_job(GetJobRequest { job_id }).await.map_err(status_error)?.into_inner();
            print(&job_json(&job))
        }
        FinetuneCommand::List { state, page_size, page_token } => {
            let state = match state {
                Some(s) => JobState::from_str_name(&format!("JOB_STATE_{}", s.to_uppercase()))
                    .ok_or_else(|| anyhow::anyhow!("unknown state {s:?}"))? as i32,
                None => 0,
            };
            let response = client
                .list_jobs(ListJobsRequest { page_size, page_token, state })
                .await
                .map_err(status_error)?
                .into_inner();
            print(
                &json!({ "jobs": response.jobs.iter().map(job_json).collect::<Vec<_>>(), "next_page_token": response.next_page_token }),
            )
        }
        FinetuneCommand::Cancel { job_id } => {
            let job = client.cancel_job(CancelJobRequest { job_id }).await.map_err(status_error)?.into_inner();
            print(&job_json(&job))
        }
    }
}

fn print(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Reads `dir/<class>/<images>` with the server's own folder reader and limits.
fn read_image_folder(dir: &Path) -> Result<Vec<LabeledImage>> {
    let (root, folder) = match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => {
            (if parent.as_os_str().is_empty() { Path::new(".") } else { parent }, name.to_string_lossy().into_owned())
        }
        _ => bail!("{} is not an image folder", dir.display()),
    };
    read_server_folder(root, &folder, &DatasetLimits::default())
}

pub async fn upload(
    client: &mut FineTuneServiceClient<AuthChannel>,
    dir: &Path,
    name: Option<String>,
) -> Result<DatasetInfo> {
    let images = read_image_folder(dir)?;
    let name = name.unwrap_or_else(|| {
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "upload".into())
    });
    let chunks: Vec<UploadDatasetChunk> = images
        .chunks(64)
        .enumerate()
        .map(|(i, chunk)| UploadDatasetChunk {
            name: if i == 0 { name.clone() } else { String::new() },
            images: chunk
                .iter()
                .map(|im| crate::proto::v1::LabeledImage { image: im.bytes.clone(), label: im.label.clone() })
                .collect(),
        })
        .collect();
    let response = client.upload_dataset(tokio_stream::iter(chunks)).await.map_err(status_error)?;
    Ok(response.into_inner())
}

async fn create_job(client: &mut FineTuneServiceClient<AuthChannel>, args: CreateArgs) -> Result<Job> {
    let data = match (args.dataset, args.data, args.server_folder) {
        (Some(id), None, None) => create_job_request::Data::DatasetId(id),
        (None, Some(dir), None) => create_job_request::Data::DatasetId(upload(client, &dir, None).await?.dataset_id),
        (None, None, Some(folder)) => create_job_request::Data::ServerFolder(folder),
        _ => bail!("give exactly one of --dataset, --data or --server-folder"),
    };
    let request = CreateJobRequest {
        base_model: args.base_model,
        base_version: args.base_version,
        output_model: args.output_model,
        hyper_parameters: Some(HyperParameters {
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.lr,
            temperature: args.temperature,
            trainable_stages: args.trainable_stages,
            seed: args.seed,
            holdout_fraction: args.holdout,
        }),
        data: Some(data),
        allow_worse: args.allow_worse,
    };
    Ok(client.create_job(request).await.map_err(status_error)?.into_inner())
}

async fn watch_job(client: &mut FineTuneServiceClient<AuthChannel>, job_id: &str) -> Result<()> {
    let mut events =
        client.watch_job(WatchJobRequest { job_id: job_id.to_string() }).await.map_err(status_error)?.into_inner();
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut last = None;
    while let Some(event) = events.message().await.map_err(status_error)? {
        let job = event.job.clone().unwrap_or_default();
        bar.set_prefix(job.state().as_str_name().trim_start_matches("JOB_STATE_").to_lowercase());
        bar.set_position((job.progress * 1000.0) as u64);
        match event.event {
            Some(job_event::Event::Epoch(e)) => bar.println(format!("epoch {}: loss {:.4}", e.epoch, e.train_loss)),
            Some(job_event::Event::Before(e)) => bar.println(format!("before: {}", evaluation_line(&e))),
            Some(job_event::Event::After(e)) => bar.println(format!("after:  {}", evaluation_line(&e))),
            Some(job_event::Event::Message(m)) => bar.set_message(m),
            _ => {}
        }
        last = Some(job);
    }
    bar.finish_and_clear();
    let job = last.ok_or_else(|| anyhow::anyhow!("the server sent no event for job {job_id}"))?;
    print(&job_json(&job))?;
    if job.state() != JobState::Succeeded {
        bail!("job {job_id} ended {}", job.state().as_str_name());
    }
    Ok(())
}

/// "held-out k-NN 0.7333 [0.6094, 0.8289] on 60 images, linear probe 0.7500; change +0.0167 [-0.0500, +0.0833]"
fn evaluation_line(e: &crate::proto::v1::Evaluation) -> String {
    let interval = e.knn_accuracy_interval.unwrap_or_default();
    let mut line = format!(
        "held-out k-NN {:.4} [{:.4}, {:.4}] on {} images, linear probe {:.4}",
        e.knn_accuracy, interval.low, interval.high, e.images, e.linear_probe_accuracy
    );
    if let Some(change) = &e.knn_change {
        let i = change.interval.unwrap_or_default();
        line.push_str(&format!("; change {:+.4} [{:+.4}, {:+.4}]", change.value, i.low, i.high));
    }
    line
}

fn dataset_json(info: &DatasetInfo) -> Value {
    json!({ "dataset_id": info.dataset_id, "name": info.name, "size": info.size, "class_counts": info.class_counts, "sha256": info.sha256, "created_at": info.created_at })
}

/// A job as JSON for people and scripts.
pub fn job_json(job: &Job) -> Value {
    let h = job.hyper_parameters.unwrap_or_default();
    let evaluation = |e: &Option<crate::proto::v1::Evaluation>| {
        e.as_ref().map(|e| {
            let interval = |i: Option<crate::proto::v1::Interval>| i.map(|i| json!([i.low, i.high]));
            json!({
                "knn_accuracy": e.knn_accuracy,
                "knn_accuracy_interval": interval(e.knn_accuracy_interval),
                "images": e.images,
                "linear_probe_accuracy": e.linear_probe_accuracy,
                "knn_change": e.knn_change.as_ref().map(|c| json!({ "value": c.value, "interval": interval(c.interval) })),
            })
        })
    };
    json!({
        "job_id": job.job_id,
        "state": job.state().as_str_name().trim_start_matches("JOB_STATE_"),
        "base_model": job.base_model,
        "base_version": job.base_version,
        "output_model": job.output_model,
        "output_version": job.output_version,
        "dataset_id": job.dataset_id,
        "hyper_parameters": {
            "epochs": h.epochs, "batch_size": h.batch_size, "learning_rate": h.learning_rate, "temperature": h.temperature,
            "trainable_stages": h.trainable_stages, "seed": h.seed, "holdout_fraction": h.holdout_fraction,
        },
        "allow_worse": job.allow_worse,
        "progress": job.progress,
        "epochs": job.epochs.iter().map(|e| json!({ "epoch": e.epoch, "train_loss": e.train_loss })).collect::<Vec<_>>(),
        "before": evaluation(&job.before),
        "after": evaluation(&job.after),
        "error": job.error.as_ref().map(|e| json!({ "code": e.code, "message": e.message })),
        "message": job.message,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    })
}
