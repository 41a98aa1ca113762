"""Speed of ObjGuided, Mask R-CNN and PointRend side by side, on the same images and boxes.

The command line is ``tools/benchmark.py``; what it measures, how, and the current results are in
``benchmarks/README.md``. The modules, in the order a run uses them:

* ``inputs``: synthetic scenes of exactly N objects, dataset images with their annotated boxes,
  a training batch;
* ``runners``: one model per architecture, its inference split into the dense part and the
  per-instance part on given boxes (the equal-N protocol, in that module's docstring);
* ``timing``: interleaved inferences and training steps, medians;
* ``flops``: multiply-adds, counted at dispatch;
* ``memory``: peak memory of one inference;
* ``profile``: operator and function tables of ObjGuided;
* ``report``: the JSON report's environment, its markdown rendering and the ratio line.
"""
