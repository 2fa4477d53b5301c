"""cjepa_jax: I-JEPA and C-JEPA pretraining in JAX/Flax."""

import setuptools

setuptools.setup(
    name='cjepa_jax',
    version='0.1.0',
    description='I-JEPA and C-JEPA self-supervised pretraining in JAX/Flax for TPU and GPU meshes.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['cjepa_jax', 'cjepa_jax.*']),
    python_requires='>=3.10',
    # Lower bounds are the versions the test suite ran on (2026-11-22).
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        # The input loader (config.data.loader='grain', the default) and its ArrayRecord files;
        # no TensorFlow.
        'grain>=0.2.18',
        'array-record>=0.8.1',
        'pillow>=10.0',
        'ml-collections>=1.1.0',
        'einops>=0.8.2',
        'numpy>=2.0',
        'absl-py>=2.1',
        'tensorboardX>=2.6',
        'matplotlib>=3.8',
    ],
    extras_require={
        # The tests run the tf.data loader too, so `.[test]` pulls `.[tf]`.
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'pillow>=10.0', 'cjepa_jax[tf]'],
        # The tf.data loader (config.data.loader='tf') and tfds dataset names (tfds datasets read
        # by the grain loader through `tfds.data_source`). TensorFlow feeds the hosts only; it
        # never touches the accelerator.
        'tf': ['tensorflow-cpu>=2.21.0', 'tensorflow-datasets>=4.9.10'],
        # CPU wheel is enough: converting reference checkpoints, and timing the reference step
        # beside ours (benchmarks/reference_step.py).
        'torch': ['torch>=2.2'],
        'tensorboard': ['tensorboard>=2.15'],  # The viewer for the event files the trainer writes.
        # libtpu, the TPU compiler, at the version the installed jax pins: `cjepa-compile`
        # compiles for a TPU slice on any host (and a TPU VM needs it to run).
        'tpu': ['jax[tpu]'],
        # Hugging Face interop (cjepa-convert-hf, cjepa-export) needs only safetensors; the parity
        # tests also load the result in transformers, which needs torch: install the CPU wheel
        # first (pip install torch==2.13.0), transformers itself does not pull torch.
        'hf': ['safetensors>=0.8.0', 'transformers>=5.25.0'],
    },
    entry_points={
        'console_scripts': [
            'cjepa-train=cjepa_jax.train:run',
            'cjepa-probe=cjepa_jax.probe:run',
            'cjepa-finetune=cjepa_jax.finetune:run',
            'cjepa-convert-torch=cjepa_jax.convert_torch:run',
            'cjepa-compile=cjepa_jax.compile:run',
            'cjepa-convert-hf=cjepa_jax.convert_hf:run',
            'cjepa-export=cjepa_jax.export:run',
            'cjepa-convert-array-record=cjepa_jax.convert_array_record:run',
        ],
    },
)
