"""The command line, and the one place where the stages are wired together: start reading here.

``soco-det COMMAND ...`` is :func:`soco_det.commands.main.main`: it lists the sub-commands below,
parses the words and runs one. Each sub-command is a module of this folder with
``add_arguments(parser)`` and ``run(args) -> int``; it parses its options, builds the configs and
calls the stage libraries (``proposals``, ``data``, ``models``, ``export``, ``engine``, ``probe``,
``transfer``), which know nothing of argparse. The stage modules are imported inside ``run``, so
``soco-det --help`` loads no torch or numpy.

==============  =====================================================================
``synth``       the sample scenes (:mod:`soco_det.synth`)
``proposals``   selective search, merge, import, export, info (:mod:`soco_det.proposals`)
``pretrain``    SoCo pretraining (:mod:`soco_det.engine`)
``export``      weights for torchvision, detectron2, mmdet, timm (:mod:`soco_det.export`)
``probe``       the frozen-feature object probe (:mod:`soco_det.probe`)
``finetune``    Mask R-CNN / Faster R-CNN fine-tuning (:mod:`soco_det.transfer`)
``evaluate``    COCO AP of a fine-tuned detector (:mod:`soco_det.transfer`)
``viz``         pictures of scenes, proposals and views
``demo``        every stage on the sample scenes, with a report
==============  =====================================================================
"""
