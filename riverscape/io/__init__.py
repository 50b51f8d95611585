"""Input and output, one job per module.

* :mod:`.specs`: model/data specs and importing the user code they name;
* :mod:`.reading`: reading checkpoint files safely and loading them into a model;
* :mod:`.saving`: writing riverscape checkpoints;
* :mod:`.data_specs`: resolving data specs and checking a model against its data;
* :mod:`.hf`: Hugging Face model folders (``save_pretrained``: causal LMs and sequence classifiers) and
  the text files (plain, or ``LABEL<TAB>TEXT``) tokenised for them;
* :mod:`.atomic`: writing a file atomically (temporary file beside it + ``os.replace``);
* :mod:`.jsonable`: converting results to plain JSON values.

Nothing is imported here, so ``riverscape.io.atomic`` and ``riverscape.io.jsonable`` load
without torch. The checkpoint API's stable import path is :mod:`riverscape.checkpoint`;
atomic output *directories* (with ownership markers) are :mod:`riverscape.outdir`.
"""
