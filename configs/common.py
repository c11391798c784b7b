"""Fields shared by every config: defaults of the paper's setup. `get_config()` files start from this."""

import ml_collections


def phase(name: str, epochs: int, freeze: tuple[str, ...], optimizer: str = "rmsprop",
          learning_rate: float = 1e-4) -> ml_collections.ConfigDict:
  """One fine-tuning phase: its length, its freezing rules (resdense_jax/optim.py) and its own optimizer."""
  return ml_collections.ConfigDict({
      "name": name,
      "epochs": epochs,
      "freeze": freeze,
      "optimizer": {
          "name": optimizer,              # rmsprop (Keras: rho 0.9, epsilon 1e-7 in the sqrt) | adam | sgd
          "learning_rate": learning_rate,
          "schedule": "constant",         # constant | cosine | warmup_cosine (over the phase)
          "warmup_steps": 0,              # any schedule: lr rises linearly from 0 over the phase's first steps
          "warmup_epochs": 0.0,           # the same in epochs (the engine resolves them to steps); not both
          "momentum": 0.0,                # sgd only (Keras SGD momentum; exact to Keras at a constant rate)
          "weight_decay": 0.0,            # decoupled, on kernels only
      },
  })


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Persistent XLA compilation cache: a second run reads its compiled steps back ("" turns it off).
  config.compilation_cache_dir = "~/.cache/resdense_jax/xla"
  # XLA's YNNPACK convolution fusions on CPU; off: Eigen's convolutions, 1.4-1.5x faster on the 2-core test
  # machine (resdense_jax/cpu_flags.py). Applied by the command lines before JAX starts; GPUs/TPUs ignore it.
  config.cpu_ynnpack = False

  config.data = ml_collections.ConfigDict()
  config.data.root = ""                   # COV19-CT-DB root: <root>/{train,validation}/{covid,non-covid}/<scan>/
  config.data.prepared_dir = ""           # TFDS copy from `python -m resdense_jax.data.prepare` (used instead of root)
  config.data.synthetic = False           # generate the synthetic collection into <workdir>/synthetic_ct instead
  config.data.synthetic_scans = ml_collections.ConfigDict({
      "train": (24, 24), "validation": (12, 12), "test": 4})
  config.data.synthetic_slice_size = 64
  config.data.synthetic_num_slices = (8, 16)
  config.data.synthetic_lesion_fraction = 1.0  # share of a synthetic COVID scan's slices with opacities (< 1: a band)
  config.data.image_size = 256
  config.data.val_fraction = 0.25         # used only when the root has no validation split
  config.data.augment = True
  config.data.rotation_factor = 0.2
  config.data.middle_fraction = 1.0       # train on the middle fraction of each scan's slices
  config.data.num_workers = 0
  config.data.prefetch = 2                # batches decoded and sent to the devices ahead of the running step
  config.data.lung_crop = False           # crop every slice to its scan's lung box before resizing (data/lungs.py)
  config.data.lung_crop_margin = 0.05     # added to the lung box on every side, as a fraction of the slice's side
  config.data.drop_lungless_slices = False  # leave out each scan's leading / trailing slices showing no lung
  # How a slice (or its lung crop) becomes the square model input, in training, evaluation, predict and explain:
  # "squash" (both sides scaled: a non-square slice is stretched) or "pad" (aspect kept, longer side scaled,
  # centred, padded with 0 = air in the window). data/augment.py `resize`.
  config.data.resize = "squash"
  config.data.balanced_sampling = False   # each epoch: classes equally likely, scans of a class equally often
  # Scan heads only (config.model.scan_head != "mean"): a training step takes batch_size scans x slices_per_scan
  # slices each, in order, from a random start with a random stride in [1, slice_stride] (0: the largest stride
  # that fits); a scan with fewer slices repeats some (resdense_jax/data/scan_batches.py).
  config.data.slices_per_scan = 16
  config.data.slice_stride = 0

  config.model = ml_collections.ConfigDict()
  config.model.backbones = ("resnet101", "densenet121")
  config.model.backbone_kwargs = ml_collections.ConfigDict()  # {backbone: constructor overrides}
  config.model.fusion_filters = 1024
  config.model.fusion_kernel = 3
  config.model.fusion_activation = ""     # "" (linear) | "relu"
  config.model.pooling = "avg"            # avg | gem
  config.model.dropout = 0.2
  config.model.num_outputs = 1            # 1: sigmoid head; 2: softmax head (use sparse_categorical_cross_entropy)
  config.model.head_init = "flax"         # flax (lecun-normal) | keras (glorot-uniform) | zeros (starts at p = 0.5)
  config.model.preprocessing = "keras"    # keras (caffe / torch per backbone) | authors (caffe, then [-1, 1])
  config.model.backbone_bn_inference = False  # True: every backbone BatchNorm in inference mode (authors' code)
  config.model.dtype = "auto"             # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 |
                                          # bfloat16; params, BatchNorm statistics and the loss stay float32
  # imagenet | none | a Keras file (.h5 weights or full model, .weights.h5, .keras) | {backbone: one of these}
  # (resdense_jax/weights/pretrained.py). Type `object`: a config file may assign a dict, the command line a
  # string or a dict literal (--config.model.pretrained='{"resnet50": "/w/a.h5", "densenet121": "imagenet"}').
  config.model.pretrained = ml_collections.FieldReference("imagenet", field_type=object)
  config.model.weights_dir = ""           # folder with the Keras .h5 files; default: the Keras cache
  config.model.download_weights = True    # fetch missing files from Keras's published URLs
  # How a scan's score is formed (resdense_jax/models/scan_heads.py): "mean" (the paper: each slice scored alone,
  # scan = mean slice probability) | "attention" (gated attention pooling over the slices' pooled fused features,
  # Ilse et al. 2018, then "predictions": one logit per scan) | "transformer" (a small transformer encoder over
  # the slice feature sequence with learned relative-position buckets, then the same attention pooling).
  config.model.scan_head = "mean"
  config.model.scan_attention_hidden = 64   # width of the gated attention's V and U
  config.model.scan_transformer = ml_collections.ConfigDict({
      "width": 64, "layers": 2, "heads": 4, "mlp_dim": 128, "position_buckets": 32, "dropout": 0.0})

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32            # global batch, split over all devices
  config.train.loss = "binary_cross_entropy"  # | sigmoid_focal_loss | sparse_categorical_cross_entropy
  config.train.label_smoothing = 0.0      # Keras's: sigmoid y -> y (1 - e) + e / 2; softmax one-hot y (1 - e) + e / k
  # none | balanced (n / (2 n_class) over the training slices) | (w_noncovid, w_covid): per-slice loss weights,
  # reduced as Keras's model.fit(class_weight=...). Any type, so --config.train.class_weight="(1, 3)" overrides.
  config.train.class_weight = ml_collections.FieldReference("none", field_type=object)
  config.train.patience = 0               # early stopping: stop after this many evaluations without a new best
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 0  # extra mid-epoch checkpoints (0: only after each evaluation)
  config.train.eval_every_epochs = 1
  config.train.async_checkpointing = True  # write checkpoints in the background while training goes on
  # 0: off (the paper; Keras keeps its moving averages). N > 0: before each evaluation (and so in every
  # checkpoint), BatchNorm moving statistics := their average over N un-augmented training batches under
  # the current weights (PreciseBN). Helps from-scratch models whose weights outrun the 0.99 moving average.
  config.train.precise_bn_batches = 0
  config.train.remat = "none"             # none | blocks: keep only block outputs, recompute inside (memory)
  config.train.fsdp = False               # split parameters and optimizer state over the "data" axis
  # 0: off. K > 0: a phase whose backbones are entirely frozen (phase 1) trains the head on the backbones'
  # features of K augmented views per training slice, computed once (resdense_jax/feature_cache.py).
  config.train.cache_frozen_features = 0
  # 0: off. d in (0, 1): an exponential moving average of the weights (decay d per step; trainable parameters
  # and BatchNorm statistics) is what gets evaluated, ranked for the best checkpoint and loaded for predict.
  config.train.ema_decay = 0.0
  config.train.ema_warmup = True          # decay min(d, (1 + t) / (10 + t)) at the phase's update t (TF's form)

  # The paper: 20 epochs; first the head with both backbones frozen, then all but the first 100 Keras layers
  # of each backbone. The split between the phases is not given in the paper; 10 + 10 here.
  config.phases = [
      phase("head", 10, ("backbones",)),
      phase("finetune", 10, ("backbones:100",)),
  ]

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 64
  config.eval.aggregation = "mean"        # mean (paper: mean slice probability) | vote (authors' code)
  config.eval.threshold = 0.5             # a scan is COVID when its score is above this
  config.eval.tta = "none"                # none | flip: slice probability = mean over the slice and its mirror
  config.eval.middle_fraction = 1.0       # evaluate on the middle fraction of each scan's slices
  config.eval.best_metric = "val_scan_macro_f1"
  # Scan heads: the scan head runs once over each whole scan, its features padded to the next multiple of this
  # (masked), so one program serves every scan up to that length; the slices go through in eval batches.
  config.eval.scan_length_bucket = 64
  return config
