"""quiz.html: a self-test on held-out real images, as DIFFusion's user study tested its participants.

All items are on one page (no state to lose between pages, works from disk in any browser). The person
picks a class per image, "Score" shows "k / n correct" in #score and marks each item right or wrong, and
"Download answers (CSV)" (#download-csv) saves `item,image,answer,truth,correct`, one row per item. The
truth is in the page (this is a biologist's self-test, not an exam) but shown only after scoring; the
same CSV text is `window.quizCsv()` and the hidden #quiz-csv, so a script or a test can read it.
"""

from __future__ import annotations

import json

from phenolens.data.display import composite
from phenolens.report.html import esc, img
from phenolens.report.tiles import fit_tile, png_uri
from phenolens.teach.page import html_page
from phenolens.teach.quiz import Quiz

QUIZ_JS = r"""
(function(){
var key=JSON.parse(document.getElementById('quiz-key').textContent);
function answerOf(n){var c=document.querySelector('input[name="q'+n+'"]:checked');return c?c.value:'';}
function cell(v){v=String(v);return /[",\r\n]/.test(v)?'"'+v.replace(/"/g,'""')+'"':v;}
function csv(){var lines=['item,image,answer,truth,correct'];key.forEach(function(k){var a=answerOf(k.item);
lines.push([k.item,k.image,a,k.truth,a===k.truth?1:0].map(cell).join(','));});return lines.join('\n')+'\n';}
window.quizCsv=csv;
function update(){document.getElementById('quiz-csv').textContent=csv();}
function score(){var right=0,open=0;key.forEach(function(k){var a=answerOf(k.item),ok=a===k.truth;if(ok)right++;
if(!a)open++;var fig=document.getElementById('item-'+k.item);fig.classList.remove('right','wrong');
fig.classList.add(ok?'right':'wrong');fig.querySelector('.verdict').textContent=ok?'\u2713 '+k.truth:
(a?'\u2717 you said '+a+'; it is '+k.truth:'\u2717 not answered; it is '+k.truth);});
document.getElementById('score').textContent=right+' / '+key.length+' correct';
document.getElementById('score-note').textContent=open?open+' not answered (counted as wrong)':'';update();}
window.quizScore=score;
document.getElementById('score-button').addEventListener('click',score);
document.querySelectorAll('input[type=radio]').forEach(function(r){r.addEventListener('change',update);});
document.getElementById('download-csv').addEventListener('click',function(){
this.href='data:text/csv;charset=utf-8,'+encodeURIComponent(csv());});
update();
})();
"""


def _key_json(quiz: Quiz) -> str:
    """The items' truth as JSON inside a <script>: '</' escaped so no file name can close the script."""
    data = [dict(item=q.item, image=q.image, truth=q.truth) for q in quiz.items]
    return json.dumps(data, ensure_ascii=True).replace("</", "<\\/")


def quiz_page(quiz: Quiz, title_name: str) -> str:
    """The page; TITLE_NAME names the run the quiz goes with."""
    n = len(quiz.items)
    classes = ", ".join(quiz.conditions)
    body = [f"<section id='how'><p>{n} real image(s) that were not translated for the study page, taken evenly "
            f"from the conditions {esc(classes)}. For each, choose the condition you think it comes from, then press "
            "<b>Score</b>. The answers can be saved as a CSV file.</p><p class='note'>Images are scaled by "
            f"{esc(quiz.normalised_by)}, all alike, so brightness compares between them.</p></section>",
            "<div class='controls'><button type='button' id='score-button'>Score</button>"
            "<span id='score' aria-live='polite'></span><span id='score-note' class='note'></span> "
            "<a id='download-csv' href='#' download='quiz_answers.csv'>Download answers (CSV)</a></div>",
            "<section id='items' class='items'>"]
    for q in quiz.items:
        uri = png_uri(fit_tile(composite(q.pixels)))
        choices = "".join(f"<label><input type='radio' name='q{q.item}' value='{esc(c)}'> {esc(c)}</label>"
                          for c in quiz.conditions)
        body.append(f"<figure class='item' id='item-{q.item}' data-item='{q.item}'>"
                    f"<figcaption>Item {q.item} of {n}</figcaption>{img(uri, f'quiz item {q.item}')}"
                    f"<div class='choices' role='radiogroup' aria-label='condition of item {q.item}'>{choices}</div>"
                    "<span class='verdict'></span></figure>")
    body.append("</section><pre id='quiz-csv' hidden></pre>"
                f"<script type='application/json' id='quiz-key'>{_key_json(quiz)}</script>")
    return html_page(f"phenolens teach: quiz {title_name}", f"{n} item(s); classes {classes}", "".join(body), QUIZ_JS)
