"""Every default of maxlite. Experiment configs import this and change only what differs.

Sizes here are a small byte-level Llama so that the base alone trains on a laptop CPU.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # '' lets JAX pick (GPU if present); 'cpu' or 'gpu' forces a platform.
  config.platform = ''

  model = config.model = ml_collections.ConfigDict()
  model.vocab_size = 264  # bytes + specials of the byte tokenizer
  model.hidden_size = 128
  model.num_layers = 4
  model.num_heads = 4
  model.num_kv_heads = 4  # < num_heads: grouped-query attention; 1: multi-query
  model.head_dim = 0  # 0: hidden_size // num_heads
  model.intermediate_size = 384
  model.max_seq_len = 128
  model.rope_theta = 10_000.0
  model.norm_eps = 1e-5
  model.tie_embeddings = True
  model.init_std = 0.02
  model.param_dtype = 'float32'  # master weights; float64 enables jax x64
  model.compute_dtype = 'float32'  # bfloat16 on GPUs
  # xla | cudnn | pallas (fused, skips masked tiles) | auto (pallas on GPUs, xla on CPU)
  model.attention = 'xla'
  model.scan_layers = True  # scan keeps compile time flat in depth
  # none | full | save_matmuls | save_qkv | save_attention | offload_attention (maxlite/model/remat.py)
  model.remat = 'none'
  model.z_loss_weight = 0.0
  # standard | mup: µP in its Adam form (maxlite/model/parametrization.py), so that
  # a learning rate tuned at width mup_base_width carries over to wider models.
  model.parametrization = 'standard'
  model.mup_base_width = 0  # mup: the hidden_size the hyperparameters were tuned at
  model.mup_base_head_dim = 0  # mup: the base model's head dim; 0: head dim x mup_base_width / hidden_size
  # Mixture of Experts (maxlite/model/moe.py); 0 experts: every layer dense.
  model.num_experts = 0
  model.experts_per_token = 2  # top-k
  model.moe_intermediate_size = 0  # each expert's MLP width; 0: intermediate_size
  model.moe_every = 1  # layers n-1, 2n-1, ... are MoE (1: all); the others dense
  model.moe_shared_expert_size = 0  # width of a shared expert every token also runs, gated; 0: none
  # 0: dropless. f > 0: each expert takes at most f x its fair share of a device's
  # assignments and drops the rest (first choices first); needs moe_dispatch='all_to_all'.
  model.moe_capacity_factor = 0.0
  model.moe_dispatch = 'gather'  # over parallel.expert: gather (anywhere) | all_to_all
  model.moe_balance_loss_weight = 0.01  # Switch load-balancing loss (1.0 when balanced)
  model.moe_router_z_loss_weight = 0.001  # router z-loss: mean squared log-normaliser
  model.moe_bias_update_rate = 0.0  # DeepSeek-V3's aux-loss-free balancing step; 0: off

  data = config.data = ml_collections.ConfigDict()
  # 'embedded': the Python standard library's source, prepared on first use;
  # or a folder written by `python -m data_prep prepare`; or a mixture
  # 'folder:weight,folder:weight' (weights are shares of training tokens).
  data.source = 'embedded'
  data.mixing = 'weighted'  # weighted | proportional (all sources end their epoch together)
  data.seq_len = config.model.get_ref('max_seq_len')
  data.packing = 'concat'  # concat (documents run on into the next row) | first_fit (padded)
  data.bos_aligned = False  # concat only: a document cut at a row start restarts with BOS
  data.shuffle = True  # global shuffle of documents, reshuffled every epoch
  # Packed rows shuffled within windows of this many; 0: off. Start-up warns when
  # a window holds fewer than 4 average documents (a corpus of long documents).
  data.row_shuffle_window = 1024
  data.worker_count = 0  # Grain worker processes that pack batches; 0: a thread of the trainer
  data.worker_buffer_size = 2  # batches each worker (or the thread) keeps ready
  data.read_threads = 4  # threads reading documents from the shards
  data.cache_dir = ''  # embedded corpus cache; '': $XDG_CACHE_HOME/maxlite or ~/.cache/maxlite
  data.embedded_max_bytes = 8_000_000  # cap on corpus size read from the stdlib
  data.val_fraction = 0.02  # embedded only: prepared datasets carry their own validation split
  # Independent loader streams that make up a global batch, each reading its
  # own slice of the documents; every process runs those whose rows it holds.
  # 0: one per process. A fixed count gives the same batches on any number of
  # processes that divides it, so a run also resumes exactly on another count.
  data.loader_shards = 0

  train = config.train = ml_collections.ConfigDict()
  train.run_dir = 'runs/base'
  train.fresh_start = False  # True moves an existing run_dir aside instead of resuming
  train.steps = 200
  train.micro_batch_size = 16  # sequences per micro-step over the whole mesh
  train.grad_accum_steps = 1  # global batch = micro_batch_size * grad_accum_steps
  train.eval_interval = 100
  train.eval_steps = 4
  train.log_interval = 10
  # lm-evaluation-harness tasks (comma-separated; pip install 'maxlite[eval]') run
  # every eval_harness_interval steps and at the end on the saved checkpoint,
  # logged beside val_loss as 'harness/<task>/<metric>'. '': off.
  train.eval_harness_tasks = ''
  train.eval_harness_interval = 0  # 0: train.eval_interval
  train.eval_harness_limit = 0  # documents per task; 0: all
  train.eval_harness_include_path = ''  # a folder of task YAML files of your own
  train.nonfinite = 'stop'  # a NaN/inf loss: stop naming the step | skip the update
  train.max_skipped_in_a_row = 10  # nonfinite='skip': stop after this many skips in a row
  train.transfer_guard = 'disallow'  # catch implicit host<->device copies in the loop
  # A persistent compilation cache: a later run of the same step loads it
  # instead of compiling; '' off. Share it only with people you trust (it holds code).
  train.compile_cache_dir = ''
  # 'START:STOP': a jax.profiler trace of steps START to STOP-1 in <run_dir>/profile; '' off.
  train.profile_steps = ''

  optim = config.optim = ml_collections.ConfigDict()
  # adamw | muon: Muon for the hidden matrices, AdamW (b1, b2, eps) for the embedding, norms and head.
  optim.name = 'adamw'
  optim.lr = 3e-3
  optim.min_lr = 3e-4
  optim.warmup_steps = 20
  optim.decay = 'cosine'  # cosine | linear | constant | wsd
  optim.anneal_start_step = 0  # wsd only: constant lr until here, then decay
  optim.weight_decay = 0.1
  optim.b1 = 0.9
  optim.b2 = 0.95
  optim.eps = 1e-8
  optim.grad_clip = 1.0  # global norm; 0 disables
  optim.muon_lr = 0.0  # muon: peak lr of the hidden matrices, on optim.lr's schedule; 0: optim.lr
  optim.muon_momentum = 0.95  # muon: Nesterov momentum of the orthogonalised matrices
  # muon: scale each orthogonalised update to this RMS x lr, about AdamW's (Moonlight), so that
  # Muon's lr is on AdamW's scale; 0: Keller Jordan's sqrt(max(1, fan_out/fan_in)).
  optim.muon_rms_match = 0.2
  # dtype in which gradients are summed across devices (fsdp reduce-scatter,
  # data all-reduce). float32: a sum over many devices keeps its low bits.
  optim.grad_reduce_dtype = 'float32'

  parallel = config.parallel = ml_collections.ConfigDict()
  parallel.data = -1  # one axis may be -1: it takes the remaining devices
  parallel.fsdp = 1
  parallel.expert = 1  # splits the experts and, with data and fsdp, the batch
  parallel.tensor = 1
  parallel.context = 1  # splits every row along its length (long context); see README
  parallel.pipeline = 1  # stages; the blocks' layers are split between them
  # Micro-batches that each micro-step's batch is split into for the pipeline; 0: one per stage.
  parallel.pipeline_microbatches = 0
  # Layer groups per stage: 1 for 'afab' and '1f1b'; R > 1 for 'circular' and
  # 'interleaved_1f1b' (bubble (stages-1)/(R*micro-batches+stages-1), R times the hops).
  parallel.pipeline_repeats = 1
  # 'afab' (GPipe) and 'circular': backward by autodiff, activations of every
  # micro-batch alive at once; '1f1b' and 'interleaved_1f1b': one forward and
  # one backward per iteration, O(stages) micro-batches alive (maxlite.model.pipeline_1f1b).
  parallel.pipeline_schedule = 'afab'
  parallel.zero1 = False  # shard optimizer state over `data` as well

  checkpoint = config.checkpoint = ml_collections.ConfigDict()
  checkpoint.interval = 100  # steps; the final step is always saved
  checkpoint.max_to_keep = 3  # the newest N are kept ...
  checkpoint.keep_every = 0  # ... plus every step that is a multiple of this, forever; 0: none
  checkpoint.async_save = True  # write in the background while training goes on
  # A Hugging Face Llama folder (config.json + safetensors) whose weights start
  # a new run; ignored once the run has a checkpoint of its own.
  checkpoint.init_from_hf = ''

  # How processes find each other (maxlite/distributed.py): auto | slurm | env | none.
  distributed = config.distributed = ml_collections.ConfigDict()
  distributed.mode = 'auto'
  distributed.init_timeout_s = 300  # wait this long for the coordinator and every process
  distributed.heartbeat_timeout_s = 100  # a process silent this long is dead: the others stop

  logging = config.logging = ml_collections.ConfigDict()
  logging.peak_flops_per_device = 0.0  # 0: look the device kind up in maxlite.metrics
  logging.tensorboard = True  # written when tensorboardX or tensorflow is installed
  # Weights & Biases (pip install 'maxlite[wandb]'): '' is off. A resumed run_dir
  # continues its W&B run; WANDB_MODE=offline logs to <run_dir>/wandb/.
  logging.wandb_project = ''
  logging.wandb_entity = ''  # '': your default entity
  logging.wandb_run_name = ''  # '': the run_dir's name
  logging.wandb_tags = ''  # comma-separated
  return config
