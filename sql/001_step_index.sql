-- MM-PRM step index, version 1.
-- Seeds, annotation runs and their chunk leases, trees and every step node with its MC value,
-- and the artefacts derived from them (datasets, checkpoints, evaluations).

CREATE TABLE seed_problems (
    problem_id      TEXT PRIMARY KEY,
    question        TEXT NOT NULL,
    correct_answer  TEXT NOT NULL,
    image_key       TEXT NOT NULL,              -- object key, content-addressed by image_sha256
    image_sha256    TEXT NOT NULL,
    content_hash    TEXT NOT NULL UNIQUE,       -- sha256 of question, answer and image bytes
    source          TEXT NOT NULL,              -- the seed file it came from
    split           TEXT,
    extra           JSONB NOT NULL DEFAULT '{}'::jsonb,   -- fields beyond SPEC §1 (e.g. gt_steps)
    ingested_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX seed_problems_split ON seed_problems (split);

CREATE TABLE annotation_runs (
    run_id          TEXT PRIMARY KEY,
    policy_backend  TEXT NOT NULL,
    policy_model    TEXT NOT NULL,
    config          JSONB NOT NULL,             -- search + sampling settings of the run
    config_hash     TEXT NOT NULL,              -- policy + config, to find stale trees
    status          TEXT NOT NULL DEFAULT 'created'
                    CHECK (status IN ('created', 'running', 'succeeded', 'failed')),
    stats           JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ
);

-- A chunk is a lease on a set of problems; problems are leased one by one inside it so that a
-- worker that finishes early can take unclaimed problems of unfinished chunks.
CREATE TABLE chunks (
    run_id          TEXT NOT NULL REFERENCES annotation_runs ON DELETE CASCADE,
    chunk_index     INT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts        INT NOT NULL DEFAULT 0,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, chunk_index)
);

CREATE TABLE chunk_problems (
    run_id          TEXT NOT NULL,
    chunk_index     INT NOT NULL,
    problem_id      TEXT NOT NULL REFERENCES seed_problems,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'leased', 'done', 'failed')),
    lease_owner     TEXT,
    lease_expires_at TIMESTAMPTZ,
    attempts        INT NOT NULL DEFAULT 0,
    error           TEXT,
    PRIMARY KEY (run_id, problem_id),
    FOREIGN KEY (run_id, chunk_index) REFERENCES chunks ON DELETE CASCADE
);
CREATE INDEX chunk_problems_open ON chunk_problems (run_id, chunk_index) WHERE status <> 'done';

CREATE TABLE trees (
    tree_id         BIGSERIAL PRIMARY KEY,
    run_id          TEXT NOT NULL REFERENCES annotation_runs ON DELETE CASCADE,
    problem_id      TEXT NOT NULL REFERENCES seed_problems,
    root_mc_value   DOUBLE PRECISION NOT NULL,
    visit_count     INT NOT NULL,
    num_nodes       INT NOT NULL,
    num_rollouts    INT NOT NULL,
    num_searches    INT NOT NULL,
    tree_key        TEXT NOT NULL,              -- full SPEC §4 tree JSON in the object store
    tree_sha256     TEXT NOT NULL,
    config_hash     TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (run_id, problem_id)
);
CREATE INDEX trees_problem ON trees (problem_id);

CREATE TABLE step_nodes (
    tree_id         BIGINT NOT NULL REFERENCES trees ON DELETE CASCADE,
    node_index      INT NOT NULL,               -- pre-order, root = 0
    parent_index    INT,
    depth           INT NOT NULL,
    prefix_len      INT NOT NULL,               -- steps before this node's own steps
    steps           JSONB NOT NULL,             -- the partial solution added at this node
    mc_value        DOUBLE PRECISION NOT NULL,
    visit_count     INT NOT NULL,
    num_correct     INT NOT NULL,
    num_incorrect   INT NOT NULL,
    is_first_error  BOOLEAN NOT NULL,           -- mc = 0 under a parent with mc > 0
    PRIMARY KEY (tree_id, node_index)
);
CREATE INDEX step_nodes_first_error ON step_nodes (tree_id) WHERE is_first_error;
CREATE INDEX step_nodes_mc ON step_nodes (mc_value);

CREATE TABLE datasets (
    dataset_id      TEXT PRIMARY KEY,           -- version: hash of sources and parameters
    run_ids         TEXT[] NOT NULL,
    params          JSONB NOT NULL,
    counts          JSONB NOT NULL,
    paths_key       TEXT NOT NULL,
    formats         JSONB NOT NULL DEFAULT '{}'::jsonb,   -- format name -> object keys
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE checkpoints (
    checkpoint_id   TEXT PRIMARY KEY,
    dataset_id      TEXT NOT NULL REFERENCES datasets,
    base_model      TEXT NOT NULL,
    uri             TEXT NOT NULL,
    config          JSONB NOT NULL,
    metrics         JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE evaluations (
    evaluation_id   TEXT PRIMARY KEY,
    checkpoint_id   TEXT REFERENCES checkpoints,
    policy_model    TEXT NOT NULL,
    num_problems    INT NOT NULL,
    num_candidates  INT NOT NULL,
    report_key      TEXT NOT NULL,
    plot_key        TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE evaluation_results (
    evaluation_id   TEXT NOT NULL REFERENCES evaluations ON DELETE CASCADE,
    method          TEXT NOT NULL,              -- aggregator, or random / pass@k / majority
    n               INT NOT NULL,
    accuracy        DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (evaluation_id, method, n)
);
