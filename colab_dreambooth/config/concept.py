"""One concept of a run: the subject (or style) to teach, its prompts, images and class images.

Field names are the AUTOMATIC1111 Dreambooth extension's concept keys, so its
``concepts_list`` files read the same here (:mod:`colab_dreambooth.config.params`).
"""

from __future__ import annotations

from dataclasses import dataclass

from colab_dreambooth.config.commands import SampleSettings
from colab_dreambooth.config.fields import setting
from colab_dreambooth.config.prompts import EXISTING_PROMPT_CONTENTS

# Previews draw as the ``sample`` command does unless the concept says otherwise.
_SAMPLE = SampleSettings()


@dataclass
class Concept:
    """One subject (or style) to teach, with its prompts, images and class images."""

    instance_prompt: str = setting(
        "", "Instance prompt", "The prompt that calls your subject: a rare one-token word plus "
        "the class word, e.g. 'shs girl'. Keep it simple: complex prompts drift. May hold "
        "[filewords] to use each image's caption.", "Concepts")
    class_prompt: str = setting(
        "", "Class prompt", "Describes the class images, e.g. 'girl'. Must not hold the instance "
        "token. Blank = no prior preservation. May hold [filewords].", "Concepts")
    instance_data_dir: str = setting(
        "", "Instance dataset directory", "Folder with the subject's images (jpg, png, webp, "
        "bmp), each optionally with a same-name .txt caption.", "Concepts", path=True)
    class_data_dir: str = setting(
        "", "Classification dataset directory", "Folder with the class (regularization) "
        "images. Blank while a class prompt is set: they are generated into "
        "<models root>/dreambooth/<model name>/classifiers/concept_<n>.", "Concepts", path=True)
    file_prompt_contents: str = setting(
        "Description", "Existing Prompt Contents", "What your captions already hold; decides how "
        "[filewords] captions are rewritten to carry the instance token.", "Concepts",
        choices=EXISTING_PROMPT_CONTENTS)
    instance_token: str = setting(
        "", "Instance Token", "Just the rare word (e.g. 'sks'), never 'a photo of sks' or "
        "'sks dog'. Used when a prompt holds [filewords].", "Concepts")
    class_token: str = setting(
        "", "Class Token", "The class word; several allowed, comma-separated ('a woman, "
        "woman'). Used when a prompt holds [filewords].", "Concepts")
    num_class_images: int = setting(
        0, "Total Number of Class/Reg Images", "How many class images this concept uses; "
        "missing ones are generated, existing ones kept. 0 = no prior preservation. "
        "Users take about 100-200 per concept (each costs a generation).", "Concepts",
        minimum=0, maximum=100000)
    class_negative_prompt: str = setting(
        "", "Classification Image Negative Prompt", "Negative prompt when generating class "
        "images.", "Class images")
    class_guidance_scale: float = setting(
        7.5, "Classification CFG Scale", "Classifier-free guidance when generating class "
        "images.", "Class images", minimum=0.0, maximum=50.0)
    class_infer_steps: int = setting(
        40, "Classification Steps", "Inference steps per class image: more is slower, "
        "rarely better beyond 40.", "Class images", minimum=1, maximum=500)
    class_seed: int = setting(
        -1, "Class image seed", "Seed for class images; -1 = random.", "Class images",
        minimum=-1)
    save_sample_prompt: str = setting(
        "", "Sample Image Prompt", "Prompt for preview samples. Blank = the instance prompt. "
        "May hold [filewords].", "Sampling")
    save_sample_negative_prompt: str = setting(
        "", "Sample Negative Prompt", "Negative prompt for preview samples.", "Sampling")
    save_sample_template: str = setting(
        "", "Sample Prompt Template File", "A text file with one sample prompt per line "
        "(used instead of the sample prompt).", "Sampling", path=True)
    n_save_sample: int = setting(
        _SAMPLE.n, "Number of Samples to Generate", "Preview images per concept at each "
        "preview.", "Sampling", minimum=0, maximum=100)
    sample_seed: int = setting(
        _SAMPLE.seed, "Sample Seed", "Seed for preview samples; -1 = random. A fixed seed "
        "shows how the same image evolves.", "Sampling", minimum=-1)
    save_guidance_scale: float = setting(
        _SAMPLE.guidance_scale, "Sample CFG Scale", "Classifier-free guidance for preview "
        "samples.", "Sampling", minimum=0.0, maximum=50.0)
    save_infer_steps: int = setting(
        _SAMPLE.steps, "Sample Steps", "Inference steps per preview sample.", "Sampling",
        minimum=1, maximum=500)

    @property
    def wants_prior_preservation(self) -> bool:
        """True when this concept trains with class images."""
        return bool(self.class_prompt.strip()) and (
            self.num_class_images > 0 or bool(self.class_data_dir.strip()))
