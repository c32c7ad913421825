"""`phenolens teach RUN OUT`: DIFFusion's teaching mode (paper 004, §4.3).

The paper's user study taught people a subtle class difference by letting them watch each real image
turn into its minimal counterfactual, then tested them on held-out real images. This package makes the
two pages of that study from a `phenolens translate` run, each one self-contained HTML file:

- `study.html` (`pairs.py` picks what to show, `study.py` draws it): per source -> target condition,
  each image and its counterfactual as a flicker pair, a blend animation (`animation.py`) and the signed
  difference overlay of the paper's Fig. 4b (`overlay.py`);
- `quiz.html` (`quiz.py` picks and reads held-out images, `quiz_page.py` draws the self-test).

`output.py` ties them together and owns OUT the way every phenolens output folder is owned (`folders.py`).
"""

from phenolens.teach.output import TeachResult, TeachSettings, write_teaching

__all__ = ["TeachResult", "TeachSettings", "write_teaching"]
