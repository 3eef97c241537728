//! Two `contrastive serve` processes sharing one PostgreSQL job store, one model repository and
//! one data folder, as replicas behind a load balancer: jobs submitted to either run exactly
//! once, and when the replica running a job is killed with SIGKILL the other takes the job over
//! once its lease runs out, finishes it, and its watchers see the job's whole history.
//!
//! Needs a PostgreSQL database named by `CONTRASTIVE_TEST_POSTGRES`
//! (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`, a user that may create schemas; `.ci/run`
//! starts one): without it the test says so and passes without running. Needs the ONNX Runtime
//! library (`scripts/fetch-onnxruntime`).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
use std::time::{Duration, Instant};

use common::{free_port, http_get_metrics, Dirs, Server, MODEL};
use contrastive::client::finetune_client;
use contrastive::proto::v1::{
    create_job_request, job_event, CreateJobRequest, GetJobRequest, HyperParameters, InlineDataset, Job, JobEvent,
    JobState, LabeledImage, WatchJobRequest,
};
use contrastive::registry::ModelRepository;
use image::{DynamicImage, GrayImage, ImageFormat};
use tokio_stream::StreamExt;

/// Seconds a job stays with a replica without renewal: short, so the takeover is quick.
const LEASE_SECONDS: &str = "3";
const JOBS: usize = 4;
const TAKEN_OVER: &str = "taken-over";
const SHARED: &str = "shared";

/// A URL for a new, empty schema of the test database, or None (with a message) without one.
fn test_postgres_schema() -> Option<String> {
    let Some(url) = std::env::var("CONTRASTIVE_TEST_POSTGRES").ok().filter(|url| !url.is_empty()) else {
        eprintln!("CONTRASTIVE_TEST_POSTGRES is not set: the replica test needs PostgreSQL and is skipped");
        return None;
    };
    let schema = format!("replicas_{}", uuid::Uuid::new_v4().simple());
    // The synchronous client runs a runtime of its own: not on the test's.
    let (admin, create) = (url.clone(), format!("CREATE SCHEMA {schema}"));
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls).expect("connect to the test database");
        client.batch_execute(&create).expect("create a test schema");
    })
    .join()
    .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}options=-csearch_path%3D{schema}"))
}

fn png(image: GrayImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    DynamicImage::ImageLuma8(image).write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png).unwrap();
    bytes
}

/// Two classes of 24 slightly different 28 × 28 pictures each: gradients one way and the other.
fn dataset() -> InlineDataset {
    let images = (0..48u32)
        .map(|i| {
            let (label, image) = if i % 2 == 0 {
                ("rising", GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 6 + y * 3 + i) % 256) as u8])))
            } else {
                ("falling", GrayImage::from_fn(28, 28, |x, y| image::Luma([(255 - (x * 6 + y * 3 + i) % 256) as u8])))
            };
            LabeledImage { image: png(image), label: label.into() }
        })
        .collect();
    InlineDataset { images }
}

fn job_request(output_model: &str, epochs: u32) -> CreateJobRequest {
    CreateJobRequest {
        base_model: MODEL.into(),
        output_model: output_model.into(),
        hyper_parameters: Some(HyperParameters { epochs, ..Default::default() }),
        data: Some(create_job_request::Data::InlineDataset(dataset())),
        // The test is about who runs a job, not whether it helps.
        allow_worse: true,
        ..Default::default()
    }
}

async fn get(server: &Server, job_id: &str) -> Job {
    let mut client = finetune_client(&server.url, None).await.unwrap();
    client.get_job(GetJobRequest { job_id: job_id.into() }).await.unwrap().into_inner()
}

/// The events of a job, from the first, as a replica streams them.
async fn watch(server: &Server, job_id: &str) -> tonic::Streaming<JobEvent> {
    let mut client = finetune_client(&server.url, None).await.unwrap();
    client.watch_job(WatchJobRequest { job_id: job_id.into() }).await.unwrap().into_inner()
}

/// Reads a job's events up to the first progress of its training; returns them.
async fn follow_until_training(events: &mut tonic::Streaming<JobEvent>) -> Vec<JobEvent> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .expect("the job starts training within two minutes")
            .expect("the job runs")
            .unwrap();
        let training = matches!(event.event, Some(job_event::Event::Progress(p)) if p > 0.0);
        seen.push(event);
        if training {
            return seen;
        }
    }
}

/// The process id in the worker name a claim writes into the job's message
/// ("… on HOST/PID/RANDOM"), if the job is claimed.
fn worker_pid(job: &Job) -> Option<u32> {
    let worker = job.message.rsplit(" on ").next()?;
    worker.split('/').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_run_each_job_once_and_take_over_from_a_killed_one() {
    let Some(url) = test_postgres_schema() else { return };
    let dirs = Dirs::with_models();
    let metrics: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let replicas = [0, 1].map(|i| {
        let args = ["--job-store", url.as_str(), "--job-lease-seconds", LEASE_SECONDS, "--finetune-threads", "1"];
        Server::start_on(&dirs, &[&args[..], &["--metrics-addr", &metrics[i]]].concat())
    });
    for replica in &replicas {
        replica.wait_serving().await;
    }

    // Submitted alternately to each replica; the first is long enough to be caught running.
    let mut job_ids = Vec::new();
    for i in 0..JOBS {
        let mut client = finetune_client(&replicas[i % 2].url, None).await.unwrap();
        let epochs = if i == 0 { 30 } else { 2 };
        // The other jobs publish to one model, from both replicas at once.
        let model = if i == 0 { TAKEN_OVER } else { SHARED };
        let job = client.create_job(job_request(model, epochs)).await.unwrap().into_inner();
        job_ids.push(job.job_id);
    }
    let first = job_ids[0].clone();

    // Kill -9 the replica that runs the first job, once it trains. Which one it is, the claim
    // says: its message names the worker ("… on HOST/PID/RANDOM").
    let mut first_watch = watch(&replicas[0], &first).await;
    let claimed_by = follow_until_training(&mut first_watch)
        .await
        .iter()
        .rev()
        .find(|e| matches!(e.event, Some(job_event::Event::State(s)) if s == JobState::Validating as i32))
        .and_then(|e| worker_pid(e.job.as_ref().unwrap()));
    drop(first_watch);
    let pids: Vec<u32> = replicas.iter().map(Server::pid).collect();
    let holder = pids
        .iter()
        .position(|&pid| Some(pid) == claimed_by)
        .unwrap_or_else(|| panic!("the claim names the process {claimed_by:?}, neither replica {pids:?}"));
    let survivor = &replicas[1 - holder];
    let mut watch = watch(survivor, &first).await;
    replicas[holder].kill();
    let killed_at = Instant::now();

    // The survivor's watcher sees every event once, in order, to the end.
    let mut history: Vec<JobEvent> = Vec::new();
    let mut taken_over_after = None;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(300), watch.next()).await.expect("events stop") {
        let event = event.unwrap();
        let message = &event.job.as_ref().unwrap().message;
        if taken_over_after.is_none() && message.contains("stopped renewing its lease") {
            taken_over_after = Some(killed_at.elapsed());
        }
        history.push(event);
    }
    let sequences: Vec<u64> = history.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>(), "every event once, in order");
    let states: Vec<JobState> = history
        .iter()
        .filter_map(|e| match e.event {
            Some(job_event::Event::State(s)) => JobState::try_from(s).ok(),
            _ => None,
        })
        .collect();
    use JobState::*;
    assert_eq!(states, [Queued, Validating, Running, Queued, Validating, Running, Succeeded], "{history:#?}");
    let taken_over_after = taken_over_after.expect("a takeover event");

    // Every job ends SUCCEEDED, each with one version of its own model, none published twice.
    let mut finished = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while finished.len() < JOBS {
        for id in &job_ids {
            let job = get(survivor, id).await;
            if job.state().is_terminal() {
                finished.insert(id.clone(), job);
            }
        }
        assert!(Instant::now() < deadline, "jobs still running: {finished:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let repository = ModelRepository::new(&dirs.models);
    for (id, job) in &finished {
        assert_eq!(job.state(), Succeeded, "{job:?}");
        let published = repository.version_published_by(&job.output_model, id).unwrap();
        assert_eq!(published, Some(job.output_version), "{job:?}");
    }
    assert_eq!(repository.versions(TAKEN_OVER).unwrap(), vec![1], "the job taken over published once");
    let shared: Vec<u64> = (1..JOBS as u64).collect();
    assert_eq!(repository.versions(SHARED).unwrap(), shared, "one version per job, none twice, none lost");
    let survivor_metrics = metrics[1 - holder].clone();
    let text = tokio::task::spawn_blocking(move || http_get_metrics(&survivor_metrics)).await.unwrap();
    let takeovers = text.lines().find(|l| l.starts_with("contrastive_finetune_takeovers_total ")).unwrap_or_default();
    assert_eq!(takeovers, "contrastive_finetune_takeovers_total 1", "{text}");
    let succeeded = finished.values().filter(|job| job.state() == Succeeded).count();
    let versions: BTreeSet<(String, u64)> =
        finished.values().map(|job| (job.output_model.clone(), job.output_version)).collect();
    assert_eq!(versions.len(), JOBS, "no two jobs share a version");
    eprintln!(
        "replicas: {JOBS} jobs submitted, {} succeeded, 0 duplicate versions; the job of the killed replica \
         was queued again {:.1} s after kill -9 (lease {LEASE_SECONDS} s) and finished on the other",
        succeeded,
        taken_over_after.as_secs_f64()
    );
}

/// A replica that stops gracefully (SIGTERM, as in a rolling update) hands its running job back
/// at once: with a 60-second lease, the other replica takes the job over within seconds, not
/// after the lease; then a cancel at that replica stops it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_replica_hands_its_job_back_at_once() {
    let Some(url) = test_postgres_schema() else { return };
    let dirs = Dirs::with_models();
    let args = ["--job-store", url.as_str(), "--job-lease-seconds", "60", "--finetune-threads", "1"];
    let stopping = Server::start_on(&dirs, &args);
    stopping.wait_serving().await;
    let mut client = finetune_client(&stopping.url, None).await.unwrap();
    // Far more epochs than the test waits for.
    let job = client.create_job(job_request(TAKEN_OVER, 1000)).await.unwrap().into_inner();
    let mut events = watch(&stopping, &job.job_id).await;
    follow_until_training(&mut events).await;
    // No connection left open to the stopping replica, so it need not wait out its drain.
    drop((events, client));
    let other = Server::start_on(&dirs, &args);
    other.wait_serving().await;
    let mut events = watch(&other, &job.job_id).await;
    let status = std::process::Command::new("kill").args(["-TERM", &stopping.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let stopped_at = Instant::now();
    let mut seen = Vec::new();
    let handed_back_after = loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .unwrap_or_else(|_| panic!("no takeover within the 60-second lease: {seen:#?}"))
            .expect("the job goes on")
            .unwrap();
        let job = event.job.unwrap();
        if job.message.contains("stopped renewing its lease") {
            break stopped_at.elapsed();
        }
        assert!(!job.state().is_terminal(), "{seen:#?}");
        seen.push((job.state(), job.message));
    };
    assert!(stopping.wait_exit(Duration::from_secs(30)).is_some_and(|status| status.success()), "a clean exit");
    assert!(
        handed_back_after < Duration::from_secs(20),
        "taken over {handed_back_after:?} after SIGTERM: the lease was not handed back"
    );
    let mut client = finetune_client(&other.url, None).await.unwrap();
    client.cancel_job(contrastive::proto::v1::CancelJobRequest { job_id: job.job_id.clone() }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !get(&other, &job.job_id).await.state().is_terminal() {
        assert!(Instant::now() < deadline, "the cancel did not stop the job");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&other, &job.job_id).await.state(), JobState::Cancelled);
    eprintln!(
        "replicas: a job handed back by a stopping replica was taken over {:.1} s after SIGTERM (lease 60 s)",
        handed_back_after.as_secs_f64()
    );
}
