// Caption images with a `vision-gpt export-onnx` repo (fusion="cross_attention") in transformers.js, on Node.
//
//   node js/caption.mjs MODEL_FOLDER IMAGE... [--dtype fp32|fp16|int8|q8] [--max-new-tokens N]
//
// Prints a JSON list, one {"image", "caption"} per image, in order. Greedy decoding; nothing is fetched from the Hub.
// --dtype picks the graphs: fp32 onnx/*.onnx (the default here, as on transformers.js's CPU device), fp16
// onnx/*_fp16.onnx, int8 onnx/*_int8.onnx, q8 onnx/*_quantized.onnx (transformers.js's default in the browser).
// Install once with: (cd js && npm ci --ignore-scripts)

import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { env, pipeline } from '@huggingface/transformers';

const DTYPES = ['fp32', 'fp16', 'int8', 'q8'];
const USAGE =
    'usage: node js/caption.mjs MODEL_FOLDER IMAGE... [--dtype fp32|fp16|int8|q8] [--max-new-tokens N]';

function fail(message) {
    console.error(`${USAGE}\nerror: ${message}`);
    process.exit(2);
}

let parsed;
try {
    parsed = parseArgs({
        allowPositionals: true,
        options: {
            dtype: { type: 'string', default: 'fp32' },
            'max-new-tokens': { type: 'string', default: '20' },
        },
    });
} catch (error) {
    fail(error.message);
}
const { values, positionals } = parsed;
const [modelFolder, ...images] = positionals;
if (!modelFolder || images.length === 0) fail('give a model folder and at least one image');
if (!DTYPES.includes(values.dtype)) fail(`--dtype ${values.dtype} is not one of ${DTYPES.join(', ')}`);
const maxNewTokens = Number(values['max-new-tokens']);
if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) fail('--max-new-tokens must be a positive integer');

const folder = path.resolve(modelFolder);
const configPath = path.join(folder, 'config.json');
if (!fs.existsSync(configPath)) fail(`${configPath} not found: export the model with \`vision-gpt export-onnx\``);
const { model_type } = JSON.parse(fs.readFileSync(configPath, 'utf8'));
if (model_type !== 'vision-encoder-decoder') {
    fail(
        `${modelFolder} is a "${model_type}" export; transformers.js runs the cross-attention model only ` +
            '(fusion="cross_attention", exported as a "vision-encoder-decoder")',
    );
}

// A local folder only: transformers.js reads a model id (`name` or `org/name`) under `localModelPath`, any other path
// as it is (its `isValidHfModelId`), and never asks the Hub.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(folder) + path.sep;
const name = path.basename(folder);
const isModelId = /^\b[\w.-]{1,96}\b$/.test(name) && !name.includes('--') && !name.includes('..');
const captioner = await pipeline('image-to-text', isModelId ? name : folder, { dtype: values.dtype, device: 'cpu' });

const captions = [];
for (const image of images) {
    // The pipeline decodes with skip_special_tokens and trims, as transformers' does.
    const [{ generated_text }] = await captioner(path.resolve(image), {
        max_new_tokens: maxNewTokens,
        do_sample: false,
        num_beams: 1,
    });
    captions.push({ image, caption: generated_text });
}
await captioner.dispose();
console.log(JSON.stringify(captions, null, 2));
