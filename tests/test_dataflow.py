"""The caption job builds for Dataflow (options pass through, the graph serialises) without submitting."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions, WorkerOptions

from pipeline.caption import CaptionConfig, build
from pipeline.jobs import new_pipeline
from pipeline.sources import file_pattern

DATAFLOW_ARGS = [
    "--runner", "DataflowRunner", "--project", "my-project", "--region", "us-central1",
    "--temp_location", "gs://my-bucket/tmp", "--machine_type", "n1-standard-8", "--setup_file", "./setup.py",
    "--dataflow_service_options", "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver",
]


def test_caption_pipeline_builds_for_dataflow():
    options = PipelineOptions(DATAFLOW_ARGS)
    p = new_pipeline(options)  # the runner the options name (only the DirectRunner is built another way)
    assert type(p.runner).__name__ == "DataflowRunner"
    cfg = CaptionConfig(input="gs://my-bucket/images/", output="gs://my-bucket/captions",
                        captioner="Salesforce/blip-image-captioning-base", clip="ViT-B-32", clip_pretrained="openai",
                        device="cuda")
    build(p, cfg, started=0.0)
    proto = p.to_runner_api()  # every DoFn pickles and the graph converts, as submission would need
    labels = {t.unique_name for t in proto.components.transforms.values()}
    assert any("Captioner" in name for name in labels) and any("ClipEmbed" in name for name in labels)
    assert any("WriteShards" in name for name in labels) and any("Finalize" in name for name in labels)
    assert options.view_as(GoogleCloudOptions).project == "my-project"
    assert options.view_as(WorkerOptions).machine_type == "n1-standard-8"
    assert options.view_as(SetupOptions).setup_file == "./setup.py"
    assert options.view_as(GoogleCloudOptions).dataflow_service_options[0].startswith("worker_accelerator=")


def test_remote_directory_with_trailing_slash_is_listed_recursively():
    assert file_pattern("gs://my-bucket/images/") == "gs://my-bucket/images/**"
    assert file_pattern("gs://my-bucket/images/*.jpg") == "gs://my-bucket/images/*.jpg"


def test_every_grouping_of_the_caption_job_is_measured_and_only_the_shard_grouping_carries_images():
    """The graph's GroupByKeys: combiners (counts) shuffle accumulators; every other grouping is measured
    (stats.json's shuffle_bytes), and of those only the shard grouping follows the image read (the near-duplicate
    screen's joins carry keys and, for candidates only, 64x64 thumbnails)."""
    p = beam.Pipeline(options=PipelineOptions(["--runner", "DirectRunner"]))
    build(p, CaptionConfig(input="gs://my-bucket/images/", output="gs://my-bucket/captions"), started=0.0)
    transforms = p.to_runner_api().components.transforms.values()
    groupings = {t.unique_name for t in transforms if t.spec.urn == "beam:transform:group_by_key:v1"}
    combiners = {g for g in groupings if "/CombinePerKey/" in g}
    assert groupings - combiners == {"Read/GroupSidecars/Group", "WriteShards/GroupByShard/Group", "SkippedKeys/Group",
                                     "Screen/JoinCandidates/Group/CoGroupByKeyImpl/GroupByKey",
                                     "Screen/JoinRanks/Group/CoGroupByKeyImpl/GroupByKey", "Screen/DropsByKey/Group"}
