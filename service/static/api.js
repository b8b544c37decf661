/* Every call the dashboard makes to the /v1 API, each returning the document the service sends.
 *
 * The typedefs below mirror the service's response models (service/schemas.py) field for
 * field, each naming its model.  The pages read these fields and nothing else: a field that is
 * missing or renamed is a contract change, to be made here and in the schema together.
 */

/**
 * @typedef {object} SketchSpec  schemas.SketchSpecIn
 * @property {string} kind
 * @property {number} dim
 * @property {number} seed
 * @property {{name: string, pattern: string, dim: number}[] | null} groups  schemas.GroupIn
 */

/**
 * @typedef {object} Run  schemas.Run
 * @property {string} run_id
 * @property {SketchSpec} sketch
 * @property {"dr_grpo" | "grpo" | "sequence_mean"} normalization
 * @property {"sgd" | "adam"} geometry
 * @property {Object<string, number[]> | null} parameters
 * @property {number} ranks
 * @property {number} k  total sketch width of a row
 * @property {number} created_at  unix seconds
 */

/**
 * @typedef {object} StepStatus  schemas.StepStatus
 * @property {string} run_id
 * @property {number} step
 * @property {"pending" | "ready" | "failed"} state
 * @property {number} sequences
 * @property {number} rows
 * @property {number} pending_uploads
 * @property {number} uploads
 * @property {boolean} applied_update
 * @property {number | null} learning_rate
 * @property {{upload_id: string, error: string, attempts: number}[]} errors  schemas.UploadError
 * @property {number} ranks_expected
 * @property {number[]} ranks_reported
 * @property {number} token_sequences sequences with token shares (GET .../tokens when > 0)
 */

/** @typedef {Run & {steps: StepStatus[]}} RunDetail  schemas.RunDetail */

/** @typedef {"sequence" | "token_mean"} Target  sketch.token_mean.Target: nats per response, nats per token */

/**
 * @typedef {object} RunEntropyRow  schemas.RunEntropyRow
 * @property {number} step
 * @property {Target} target  every number of the row is about this entropy, in its unit
 * @property {number} delta_h1
 * @property {number} se_sampling
 * @property {number} se_sketch
 * @property {string} estimator
 * @property {"score" | "entropy_sum"} entropy_gradient  how grad H was estimated (math.md §3)
 * @property {number | null} realized
 * @property {number | null} realized_se
 * @property {"logprob_after" | "entropy_sum" | "posted" | "given" | null} realized_source
 * @property {number | null} realized_snis
 * @property {number | null} ratio
 * @property {number | null} ratio_low
 * @property {number | null} ratio_high
 * @property {boolean | null} ratio_estimable
 * @property {number | null} kl
 * @property {number | null} kl_se
 * @property {"first_order" | "second_order" | "outside" | "unknown" | null} regime
 * @property {string[]} regime_reasons
 * @property {number | null} delta_h1_applied
 * @property {number | null} se_applied
 * @property {number | null} delta_h2
 * @property {number | null} delta_h1_plus_h2
 * @property {number[]} spectrum_head
 */

/** @typedef {{run_id: string, steps: RunEntropyRow[]}} RunEntropyOut  schemas.RunEntropyOut (rows of one target) */

/**
 * @typedef {object} DiagonalEntry  schemas.DiagonalEntry
 * @property {string} id
 * @property {string | number} prompt_id  as the model says; the service sends the string form
 * @property {number} value  K(i, i)
 */

/**
 * @typedef {object} SpectrumOut  schemas.SpectrumOut
 * @property {number[]} eigenvalues  descending
 * @property {number} trace
 * @property {number} effective_rank
 * @property {number} participation_ratio
 * @property {number[][] | null} [eigenvectors]  only with ?top > 0 (the pages never ask)
 */

/**
 * @typedef {object} PairStats  schemas.PairStatsOut
 * @property {number} count
 * @property {number | null} mean_k
 * @property {number | null} mean_abs_k
 * @property {number | null} mean_rho
 * @property {number | null} mean_abs_rho
 * @property {number | null} share_frobenius
 */

/**
 * @typedef {object} Blocks  schemas.BlocksOut
 * @property {PairStats} diagonal
 * @property {PairStats} same_prompt
 * @property {PairStats} cross_prompt
 * @property {{prompts: string[], mean_k: (number | null)[][], mean_rho: (number | null)[][]}} prompt_matrix
 *   schemas.PromptMatrixOut; null: a prompt with one sequence has no pairs within itself
 */

/**
 * @typedef {object} Quadrant  schemas.QuadrantOut
 * @property {"positive" | "negative"} advantage
 * @property {"above_mean" | "below_mean"} logprob
 * @property {number} sum
 * @property {number} count
 */

/**
 * @typedef {object} Decomposition  schemas.DecompositionOut
 * @property {{diagonal: PairTypeValue, same_prompt: PairTypeValue, cross_prompt: PairTypeValue}} pair_types
 * @property {Quadrant[]} quadrants
 * @property {Object<string, number> | null} groups  null unless the run's sketch has groups
 */

/** @typedef {{value: number | null, share: number | null}} PairTypeValue  schemas.PairTypeValue */

/**
 * @typedef {object} SequenceContribution  schemas.SequenceContributionOut
 * @property {string} id
 * @property {string} prompt_id
 * @property {"update" | "entropy"} role
 * @property {number} advantage
 * @property {number} logprob
 * @property {number} num_tokens
 * @property {number | null} a  a_i, an update row of the estimator
 * @property {number | null} b  b_j, an entropy row of the estimator
 * @property {number | null} c
 * @property {number | null} h  the entropy-side coefficient of the answer's target
 */

/**
 * @typedef {object} Realized  schemas.RealizedChangeOut
 * @property {number} delta_h  the realized change of the answer's target
 * @property {"logprob_after" | "entropy_sum" | "posted" | "given"} source  entropy_sum: from the
 *   sequences' entropy_sum / entropy_sum_after with logprob_after (the only source of token_mean)
 * @property {number | null} entropy_before
 * @property {number | null} entropy_after
 * @property {number} num_sequences
 * @property {number} num_prompts
 * @property {"control_variate" | "snis" | null} estimator  set when estimated from the sequences
 * @property {number | null} se
 * @property {number | null} delta_h_snis
 * @property {number | null} kl
 * @property {number | null} kl_se
 */

/**
 * @typedef {object} RatioInterval  schemas.RatioIntervalOut
 * @property {number | null} value
 * @property {number | null} low
 * @property {number | null} high
 * @property {boolean} estimable
 * @property {number} z
 * @property {number} correlation
 */

/**
 * @typedef {object} TaylorCheck  schemas.TaylorOut
 * @property {"first_order" | "second_order" | "outside" | "unknown"} regime
 * @property {number | null} kl
 * @property {number | null} kl_se
 * @property {number | null} h2_ratio
 * @property {string[]} reasons
 */

/**
 * @typedef {object} NoiseScale  schemas.NoiseScaleOut
 * @property {number | null} tr_sigma
 * @property {number | null} g_norm2
 * @property {number | null} b_simple
 * @property {number} num_prompts
 */

/**
 * @typedef {object} EntropyOut  schemas.EntropyOut
 * @property {number} delta_h1
 * @property {"independent" | "u_statistic" | "plugin" | "cross_fit"} estimator
 * @property {number} se_sampling
 * @property {number} se_sketch
 * @property {Decomposition} decomposition
 * @property {SequenceContribution[]} per_sequence
 * @property {number | null} delta_h1_diag
 * @property {number | null} cov_baseline
 * @property {NoiseScale} noise_scale
 * @property {number} learning_rate
 * @property {number} step_norm
 * @property {string} normalization
 * @property {number} num_update
 * @property {number} num_entropy
 * @property {number} num_prompts
 * @property {number | null} delta_h1_applied
 * @property {number | null} se_applied  its standard error, the update held fixed
 * @property {number | null} delta_h2  null for token_mean (not derived)
 * @property {number | null} delta_h1_plus_h2
 * @property {Realized | null} realized  null: no realized change known yet
 * @property {number | null} ratio
 * @property {RatioInterval | null} ratio_interval  null exactly when realized is
 * @property {TaylorCheck} taylor
 * @property {Target} target  every number is about this entropy, in its unit
 * @property {"score" | "entropy_sum"} entropy_gradient  how grad H was estimated (math.md §3)
 */

/**
 * @typedef {object} TokenShare  schemas.TokenShareOut
 * @property {string} sequence_id
 * @property {number} position  its index among the sequence's response tokens
 * @property {number} token_id
 * @property {string | null} token  its decoded text, when the trainer sent it
 * @property {number} share  a_{i,t}: its exact part of the step's dH1 (< 0: pushes entropy down)
 * @property {number} cov_score  Cui et al.'s (A - mean A)(log pi - mean log pi) over the step
 * @property {number} logprob
 * @property {number} advantage
 */

/**
 * @typedef {object} TokenSequenceTotal  schemas.TokenSequenceTotal
 * @property {string} id
 * @property {string} prompt_id
 * @property {number} num_tokens
 * @property {number} total  its tokens' shares summed: its a_i
 */

/**
 * @typedef {object} Covariance  schemas.CovarianceOut
 * @property {number} num_tokens
 * @property {number} kl_cov_ratio
 * @property {number} k  KL-Cov's selection, max(1, int(num_tokens * kl_cov_ratio))
 * @property {number} precision_at_k  of KL-Cov's k tokens, the fraction among the k pushing entropy down most
 * @property {number | null} spearman  rank correlation of cov_score with -share
 * @property {number} selected_sum
 * @property {number | null} selected_share  the part of dH1 KL-Cov's tokens carry
 * @property {number} clip_cov_ratio
 * @property {number} clip_cov_lb
 * @property {number} clip_cov_ub
 * @property {number} clip_k
 * @property {number} clip_candidates
 * @property {number | null} clip_candidate_share
 */

/**
 * @typedef {object} TokensOut  schemas.TokensOut
 * @property {string} run_id
 * @property {number} step
 * @property {"independent" | "u_statistic" | "plugin" | "cross_fit"} estimator
 * @property {Target} target
 * @property {number} learning_rate
 * @property {number} num_sequences
 * @property {number} num_tokens
 * @property {number} total  every share summed: dH1 of the pushed sequences
 * @property {TokenShare[]} down  the tokens pushing entropy down most, most negative first
 * @property {TokenShare[]} up  the tokens pushing entropy up most, largest first
 * @property {TokenSequenceTotal[]} sequences
 * @property {TokenShare[] | null} sequence  every token of ?sequence=, in order
 * @property {Covariance} covariance
 */

// The token never travels in a URL (access logs, browser history): it is typed into the page and
// kept in this tab's session storage.
const TOKEN_KEY = "kernelscope.token";

/** Keep `value` as this tab's API token (an empty value forgets it). */
export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Forget a token that earlier versions of the page kept in local storage (it outlived the tab). */
export function dropStoredToken() {
  localStorage.removeItem(TOKEN_KEY);
}

/** A non-2xx answer; `problem` is its problem+json document (null if the body is not one). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem ? problem.detail : `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

/** GET a /v1 JSON document; throws ApiError on a non-2xx answer. */
async function get(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, { headers, cache: "no-store" });
  if (!res.ok) {
    // a proxy in front of the service may answer with its own, non-problem body
    const type = res.headers.get("content-type") || "";
    const problem = type.startsWith("application/problem+json") ? await res.json() : null;
    throw new ApiError(res.status, problem);
  }
  return res.json();
}

const enc = encodeURIComponent;
const stepPath = (runId, step) => `/v1/runs/${enc(runId)}/steps/${step}`;
// an analysis asked for right after its step's status said ready: ?wait rides out a race
// with a new upload instead of a 409
const waitQuery = (wait) => (wait ? `?wait=${wait}` : "");
/** "?wait=5&target=token_mean": the parameters that are set, in this order. */
const entropyQuery = (wait, target) => {
  const q = new URLSearchParams();
  if (wait) q.set("wait", String(wait));
  if (target) q.set("target", target);
  const text = q.toString();
  return text ? `?${text}` : "";
};

/** GET /v1/runs. @returns {Promise<Run[]>} oldest first */
export const listRuns = () => get("/v1/runs");

/** GET /v1/runs/{run_id}. @returns {Promise<RunDetail>} */
export const getRun = (runId) => get(`/v1/runs/${enc(runId)}`);

/** GET /v1/runs/{run_id}/entropy?target=. @param {Target} target @returns {Promise<RunEntropyOut>} */
export const getRunEntropy = (runId, target) => get(`/v1/runs/${enc(runId)}/entropy${entropyQuery(0, target)}`);

/** GET /v1/runs/{run_id}/steps/{step}. @returns {Promise<StepStatus>} */
export const getStep = (runId, step) => get(stepPath(runId, step));

/** GET .../steps/{step}/kernel/spectrum. @returns {Promise<SpectrumOut>} */
export const getSpectrum = (runId, step, wait = 0) => get(`${stepPath(runId, step)}/kernel/spectrum${waitQuery(wait)}`);

/** GET .../steps/{step}/kernel/blocks. @returns {Promise<Blocks>} */
export const getBlocks = (runId, step, wait = 0) => get(`${stepPath(runId, step)}/kernel/blocks${waitQuery(wait)}`);

/** GET .../steps/{step}/kernel/diagonal. @returns {Promise<DiagonalEntry[]>} */
export const getDiagonal = (runId, step, wait = 0) => get(`${stepPath(runId, step)}/kernel/diagonal${waitQuery(wait)}`);

/** GET .../steps/{step}/entropy?target= (the default estimator). @param {Target} target @returns {Promise<EntropyOut>} */
export const getStepEntropy = (runId, step, target, wait = 0) => get(`${stepPath(runId, step)}/entropy${entropyQuery(wait, target)}`);

/**
 * GET .../steps/{step}/tokens?top=&sequence=&kl_cov_ratio=: the step's exact token shares
 * (an ApiError with status 404 when the trainer pushed none).
 * @param {{top?: number, sequence?: string, klCovRatio?: number}} opts  unset: the service's defaults
 * @returns {Promise<TokensOut>}
 */
export const getTokens = (runId, step, opts = {}) => {
  const q = new URLSearchParams();
  if (opts.top) q.set("top", String(opts.top));
  if (opts.sequence) q.set("sequence", opts.sequence);
  if (opts.klCovRatio) q.set("kl_cov_ratio", String(opts.klCovRatio));
  const text = q.toString();
  return get(`${stepPath(runId, step)}/tokens${text ? `?${text}` : ""}`);
};
