//! `contrastive.v1.FineTuneService`: dataset uploads, job creation with request validation, job
//! queries, cancellation and event streams. Training itself is the [`JobRunner`]'s.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::datasets::{read_server_folder, LabeledImage, LimitExceeded};
use super::parameters::JobParameters;
use super::runner::{CancelError, JobRunner};
use super::store::DatasetRecord;
use crate::auth::ApiKeys;
use crate::proto::v1::fine_tune_service_server::FineTuneService;
use crate::proto::v1::{
    create_job_request, CancelJobRequest, CreateJobRequest, DatasetInfo, GetJobRequest, Job, JobEvent, JobState,
    ListJobsRequest, ListJobsResponse, UploadDatasetChunk, WatchJobRequest,
};
use crate::registry::manifest::now_rfc3339;
use crate::registry::NotInRepository;

pub struct FineTuneApi {
    runner: Arc<JobRunner>,
    keys: ApiKeys,
    data_root: Option<PathBuf>,
    max_jobs_per_client: usize,
}

impl FineTuneApi {
    pub fn new(runner: Arc<JobRunner>, keys: ApiKeys, data_root: Option<PathBuf>, max_jobs_per_client: usize) -> Self {
        Self { runner, keys, data_root, max_jobs_per_client }
    }

    /// A job whose base could never load is refused before it exists: NOT_FOUND for a model or
    /// version the repository lacks, FAILED_PRECONDITION for one whose files fail their checks,
    /// INVALID_ARGUMENT for more trainable stages than the base encoder has.
    fn check_base(&self, name: &str, version: u64, parameters: &JobParameters) -> Result<(), Status> {
        let (_, manifest) = self.runner.repository().resolve(name, version).map_err(|e| {
            if e.is::<NotInRepository>() {
                Status::not_found(format!("base_model: {e}"))
            } else {
                Status::failed_precondition(format!("base_model {name:?} cannot be fine-tuned: {e:#}"))
            }
        })?;
        let stages = manifest.training.config.encoder.stages();
        if let Some(trainable) = parameters.trainable_stages.filter(|&t| t > stages) {
            return Err(Status::invalid_argument(format!(
                "hyper_parameters: trainable_stages {trainable} exceeds the {stages} stages of {name}'s encoder"
            )));
        }
        Ok(())
    }

    fn save_dataset(&self, name: &str, images: &[LabeledImage]) -> Result<DatasetRecord, Status> {
        let record = self.runner.datasets().save(name, images).map_err(dataset_status)?;
        self.runner.store().insert_dataset(&record).map_err(internal)?;
        Ok(record)
    }
}

/// A dataset over its limits is RESOURCE_EXHAUSTED; any other bad dataset INVALID_ARGUMENT.
fn dataset_status(error: anyhow::Error) -> Status {
    if error.downcast_ref::<LimitExceeded>().is_some() {
        Status::resource_exhausted(format!("dataset: {error:#}"))
    } else {
        Status::invalid_argument(format!("dataset: {error:#}"))
    }
}

fn internal(error: anyhow::Error) -> Status {
    Status::internal(format!("{error:#}"))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl FineTuneService for FineTuneApi {
    async fn upload_dataset(
        &self,
        request: Request<Streaming<UploadDatasetChunk>>,
    ) -> Result<Response<DatasetInfo>, Status> {
        let mut chunks = request.into_inner();
        let mut writer = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            let writer = match &mut writer {
                Some(writer) => writer,
                None => {
                    let name = if chunk.name.is_empty() { "upload".to_string() } else { chunk.name.clone() };
                    writer.insert(self.runner.datasets().begin(&name).map_err(internal)?)
                }
            };
            for image in &chunk.images {
                tokio::task::block_in_place(|| writer.add(&image.image, &image.label)).map_err(dataset_status)?;
            }
        }
        let writer = writer.ok_or_else(|| Status::invalid_argument("the upload holds no chunk"))?;
        let record =
            tokio::task::block_in_place(|| writer.finish()).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        self.runner.store().insert_dataset(&record).map_err(internal)?;
        tracing::info!(dataset = %record.id, images = record.size, "dataset uploaded");
        Ok(Response::new(record.to_proto()))
    }

    async fn create_job(&self, request: Request<CreateJobRequest>) -> Result<Response<Job>, Status> {
        let client = self.keys.client_of(&request);
        let request = request.into_inner();
        if request.base_model.is_empty() {
            return Err(Status::invalid_argument("base_model is required"));
        }
        crate::registry::validate_model_name(&request.base_model)
            .map_err(|e| Status::invalid_argument(format!("base_model: {e}")))?;
        let output_model =
            if request.output_model.is_empty() { request.base_model.clone() } else { request.output_model.clone() };
        crate::registry::validate_model_name(&output_model)
            .map_err(|e| Status::invalid_argument(format!("output_model: {e}")))?;
        let parameters = JobParameters::from_proto(request.hyper_parameters.as_ref())
            .map_err(|e| Status::invalid_argument(format!("hyper_parameters: {e}")))?;
        tokio::task::block_in_place(|| self.check_base(&request.base_model, request.base_version, &parameters))?;
        let active = self.runner.store().active_jobs_of_client(&client).map_err(internal)?;
        if active >= self.max_jobs_per_client {
            return Err(Status::resource_exhausted(format!(
                "{active} jobs of this client are queued or running; the limit is {}",
                self.max_jobs_per_client
            )));
        }
        let dataset_id = match request.data {
            None => {
                return Err(Status::invalid_argument(
                    "a dataset is required: dataset_id, inline_dataset or server_folder",
                ))
            }
            Some(create_job_request::Data::DatasetId(id)) => {
                self.runner
                    .store()
                    .dataset(&id)
                    .map_err(internal)?
                    .ok_or_else(|| Status::not_found(format!("dataset {id:?} does not exist")))?;
                id
            }
            Some(create_job_request::Data::InlineDataset(inline)) => {
                let images: Vec<LabeledImage> =
                    inline.images.into_iter().map(|i| LabeledImage { bytes: i.image, label: i.label }).collect();
                tokio::task::block_in_place(|| self.save_dataset("inline", &images))?.id
            }
            Some(create_job_request::Data::ServerFolder(folder)) => {
                let root = self.data_root.as_ref().ok_or_else(|| {
                    Status::failed_precondition("server folders are disabled: the server has no --finetune-data-root")
                })?;
                let limits = self.runner.datasets().limits().clone();
                let images = tokio::task::block_in_place(|| read_server_folder(root, &folder, &limits))
                    .map_err(|e| Status::invalid_argument(format!("server_folder: {e:#}")))?;
                tokio::task::block_in_place(|| self.save_dataset(&folder, &images))?.id
            }
        };
        let job = Job {
            job_id: uuid::Uuid::new_v4().simple().to_string(),
            base_model: request.base_model,
            base_version: request.base_version,
            output_model,
            hyper_parameters: Some(parameters.to_proto()),
            dataset_id,
            state: JobState::Queued as i32,
            created_at: now_rfc3339(),
            allow_worse: request.allow_worse,
            ..Default::default()
        };
        self.runner.submit(&job, &client).map_err(internal)?;
        tracing::info!(job = %job.job_id, base = %job.base_model, "job queued");
        Ok(Response::new(job))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().job_id;
        let job = self
            .runner
            .store()
            .job(&id)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no job {id:?}")))?;
        Ok(Response::new(job))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let request = request.into_inner();
        let state = match JobState::try_from(request.state) {
            Ok(JobState::Unspecified) => None,
            Ok(state) => Some(state),
            Err(_) => return Err(Status::invalid_argument(format!("unknown job state {}", request.state))),
        };
        let (jobs, next_page_token) = self
            .runner
            .store()
            .list_jobs(state, request.page_size as usize, &request.page_token)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(Response::new(ListJobsResponse { jobs, next_page_token }))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().job_id;
        let runner = self.runner.clone();
        let job = tokio::task::block_in_place(|| runner.cancel(&id)).map_err(|error| match error {
            CancelError::NotFound(_) => Status::not_found(error.to_string()),
            CancelError::Finished { .. } => Status::failed_precondition(error.to_string()),
            CancelError::Store(error) => internal(error),
        })?;
        Ok(Response::new(job))
    }

    type WatchJobStream = EventStream;

    /// History first, then live events, until the job ends.
    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().job_id;
        // Subscribe before reading the history, so no event falls between the two.
        let mut live = self.runner.subscribe();
        let history = self.runner.store().events(&id, 0).map_err(|_| Status::not_found(format!("no job {id:?}")))?;
        let store_runner = self.runner.clone();
        let stream = async_stream_of(move |tx| async move {
            let mut last = 0;
            for event in history {
                last = event.sequence;
                let done = is_terminal(&event);
                if tx.send(Ok(event)).await.is_err() || done {
                    return;
                }
            }
            // Events of this server arrive live; those of another server sharing the store (it
            // runs the job) are read from the store every half second.
            let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let batch = tokio::select! {
                    received = live.recv() => match received {
                        Ok(event) if event.job.as_ref().is_some_and(|j| j.job_id == id) => {
                            if event.sequence <= last + 1 {
                                vec![event]
                            } else {
                                // Events in between came from another server: read them all.
                                let Ok(missed) = store_runner.store().events(&id, last) else { return };
                                missed
                            }
                        }
                        Ok(_) => continue,
                        // Too slow a watcher: catch up from the store.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let Ok(missed) = store_runner.store().events(&id, last) else { return };
                            missed
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = poll.tick() => {
                        let Ok(missed) = store_runner.store().events(&id, last) else { return };
                        missed
                    }
                };
                for event in batch {
                    if event.sequence <= last {
                        continue;
                    }
                    last = event.sequence;
                    let done = is_terminal(&event);
                    if tx.send(Ok(event)).await.is_err() || done {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// The event that ends a job's history: its move into a terminal state.
fn is_terminal(event: &JobEvent) -> bool {
    event.job.as_ref().is_some_and(|job| job.state().is_terminal())
        && matches!(event.event, Some(crate::proto::v1::job_event::Event::State(_)))
}

/// A stream fed by a spawned task through a bounded channel.
fn async_stream_of<F, Fut>(produce: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
