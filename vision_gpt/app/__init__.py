"""The Gradio web app (`vision-gpt app`) and its example images."""
